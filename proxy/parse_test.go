package proxy

import (
	"encoding/json"
	"net/http"
	"net/url"
	"strings"
	"testing"
)

func TestClassify(t *testing.T) {
	tests := []struct {
		method, path string
		want         route
	}{
		{"GET", whoamiV3, route{name: routeWhoami, action: actWhoami}},
		{"GET", whoamiR0, route{name: routeWhoami, action: actWhoami}},
		{"GET", whoamiV3 + "/", route{}},
		{"GET", "/_matrix/client/v3/account/%77hoami", route{}},
		{"POST", "/_matrix/client/v3/logout", route{name: routeLogout, action: actLogout}},
		{"POST", "/_matrix/client/r0/logout", route{name: routeLogout, action: actLogout}},
		{"POST", "/_matrix/client/api/v1/logout", route{name: routeLogout, action: actLogout}},
		{"POST", "/_matrix/client/unstable/logout", route{name: routeLogout, action: actLogout}},
		{"POST", "/_matrix/client/v3/%6Cogout", route{name: routeLogout, action: actLogout}},
		{"POST", "/_matrix/client//v3/./logout/", route{name: routeLogout, action: actLogout}},
		{"GET", "/_matrix/client/v3/logout", route{}},
		{"POST", "/_matrix/client/v3/logout/all", route{name: routeLogoutAll, action: actLogoutAll}},
		{"DELETE", "/_matrix/client/v3/devices/ABC", route{name: routeDevices, action: actDeleteDevice, params: [2]string{"ABC"}}},
		{"DELETE", "/_matrix/client/v3/devices/A%2FB%20C", route{name: routeDevices, action: actDeleteDevice, params: [2]string{"A/B C"}}},
		{"GET", "/_matrix/client/v3/devices/ABC", route{}},
		{"PUT", "/_matrix/client/v3/devices/ABC", route{}},
		{"POST", "/_matrix/client/v3/delete_devices", route{name: routeDevices, action: actDeleteDevices}},
		{"POST", "/_matrix/client/v3/account/password", route{name: routePassword, action: actPassword}},
		{"POST", "/_matrix/client/v3/account/deactivate", route{name: routeDeactivate, action: actDeactivate}},
		{"POST", "/_matrix/client/v3/login", route{name: routeLogin, action: actLogin}},
		{"POST", "/_matrix/client/v3/register", route{action: actNewToken}},
		{"POST", "/_matrix/client/v3/refresh", route{action: actNewToken}},
		{"POST", "/_matrix/client/v1/refresh", route{action: actNewToken}},
		{"POST", "/_matrix/client/unstable/org.matrix.msc2918/refresh", route{action: actNewToken}},
		{"POST", "/_matrix/client/v3/rooms/!r:hs/send/logout", route{}},
		{"POST", "/_matrix/media/v3/logout", route{}},
		{"POST", "/logout", route{}},
		{"DELETE", "/_synapse/admin/v2/users/%40a%3Ahs/devices/D1", route{name: routeDevices, action: actAdminDeleteDevice, params: [2]string{"@a:hs", "D1"}}},
		{"POST", "/_synapse/admin/v2/users/@a:hs/delete_devices", route{name: routeDevices, action: actAdminDeleteDevices, params: [2]string{"@a:hs"}}},
		{"POST", "/_synapse/admin/v1/deactivate/@a:hs", route{name: routeDeactivate, action: actAdminDeactivate, params: [2]string{"@a:hs"}}},
		{"POST", "/_synapse/admin/v1/reset_password/@a:hs", route{name: routePassword, action: actAdminResetPassword, params: [2]string{"@a:hs"}}},
		{"PUT", "/_synapse/admin/v2/users/@a:hs", route{action: actAdminPutUser, params: [2]string{"@a:hs"}}},
		{"GET", "/_synapse/admin/v2/users/@a:hs", route{}},
		{"PUT", "/_matrix/client/v3/rooms/!r:hs/send/m.room.message/1", route{}},
	}
	for _, tt := range tests {
		r := &http.Request{Method: tt.method, URL: &url.URL{Path: mustUnescape(t, tt.path), RawPath: tt.path}}
		if got := classify(r); got != tt.want {
			t.Errorf("%s %s: got %+v, want %+v", tt.method, tt.path, got, tt.want)
		}
	}
}

func mustUnescape(t *testing.T, p string) string {
	t.Helper()
	u, err := url.PathUnescape(p)
	if err != nil {
		t.Fatal(err)
	}
	return u
}

func FuzzClassify(f *testing.F) {
	for _, s := range []string{whoamiV3, "/_matrix/client/v3/devices/%2F..", "/_matrix/client/../../logout", "//", "%zz"} {
		f.Add("POST", s)
		f.Add("DELETE", s)
	}
	f.Fuzz(func(t *testing.T, method, rawPath string) {
		u, err := url.Parse(rawPath)
		if err != nil {
			return
		}
		rt := classify(&http.Request{Method: method, URL: u})
		if rt.action == actWhoami && method != "GET" {
			t.Errorf("whoami answered for %s", method)
		}
		if rt.name >= numRoutes {
			t.Errorf("route name out of range: %d", rt.name)
		}
	})
}

// FuzzExtractCredentials feeds arbitrary headers and queries to the token
// extraction. It must never panic, and whatever it accepts must be a token
// that really is in the request, in exactly one place.
func FuzzExtractCredentials(f *testing.F) {
	f.Add("Bearer syt_abc", "")
	f.Add("", "access_token=syt_abc&user_id=@a:hs")
	f.Add("Bearer syt_abc", "access_token=syt_abc")
	f.Add("bearer x", "device_id=&user_id=x")
	f.Add("Bearer \x00", "access_token=%00")
	f.Fuzz(func(t *testing.T, authz, rawQuery string) {
		r := &http.Request{Header: http.Header{}, URL: &url.URL{RawQuery: rawQuery}}
		if authz != "" {
			r.Header.Set("Authorization", authz)
		}
		c, ok := extractCredentials(r)
		tok := tokenOnly(r)
		if !ok {
			return
		}
		if !validToken(c.token) {
			t.Fatalf("accepted an invalid token %q", c.token)
		}
		if tok != c.token {
			t.Fatalf("tokenOnly %q disagrees with extractCredentials %q", tok, c.token)
		}
		q, _ := url.ParseQuery(rawQuery)
		inHeader := authz == "Bearer "+c.token
		inQuery := len(q["access_token"]) == 1 && q["access_token"][0] == c.token
		if inHeader == inQuery {
			t.Fatalf("token %q: in header %v, in query %v (want exactly one)", c.token, inHeader, inQuery)
		}
		// Masquerade parameters are exactly what the query says, and an
		// empty or repeated one is never accepted.
		for name, got := range map[string]string{"user_id": c.masq.UserID, "device_id": c.masq.DeviceID,
			"org.matrix.msc3202.device_id": c.masq.MSC3202DeviceID} {
			vs := q[name]
			if (len(vs) == 0 && got != "") || (len(vs) > 0 && (len(vs) != 1 || vs[0] != got || got == "")) {
				t.Fatalf("%s: query has %q, extracted %q", name, vs, got)
			}
		}
	})
}

func FuzzParseDeleteDevices(f *testing.F) {
	f.Add([]byte(`{"devices":["A","B"]}`))
	f.Add([]byte(`{"devices":[1]}`))
	f.Add([]byte(`{"Devices":["A"]}`))
	f.Add([]byte(`{"devices":null}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		devices, ok := parseDeleteDevices(body)
		if ok && devices == nil {
			t.Fatal("ok with no device list")
		}
	})
}

func TestParseDeleteDevices(t *testing.T) {
	for body, want := range map[string]bool{
		`{"devices":["A","B"]}`: true,
		`{"devices":[]}`:        true,
		`{"devices":[1]}`:       false,
		`{"Devices":["A"]}`:     false, // Synapse reads keys exactly
		`{"devices":null}`:      false,
		`{}`:                    false,
		`[`:                     false,
	} {
		if _, ok := parseDeleteDevices([]byte(body)); ok != want {
			t.Errorf("%s: ok=%v, want %v", body, ok, want)
		}
	}
}

func FuzzParseLogoutDevices(f *testing.F) {
	for _, s := range []string{`{}`, `{"logout_devices":false}`, `{"logout_devices":"false"}`, `{"Logout_Devices":false}`, `x`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		logout, ok := parseLogoutDevices(body)
		// The only way to keep devices logged in is an explicit false.
		if !logout && (!ok || !strings.Contains(string(body), "false")) {
			t.Fatalf("%q: logout=false without an explicit false", body)
		}
	})
}

func TestParseLogoutDevices(t *testing.T) {
	for body, want := range map[string][2]bool{
		`{}`:                            {true, true},
		`{"logout_devices":true}`:       {true, true},
		`{"logout_devices":false}`:      {false, true},
		`{"logout_devices":null}`:       {true, false},
		`{"logout_devices":"false"}`:    {true, false},
		`{"Logout_Devices":false}`:      {true, true},
		`{"logout_devices":false,"x":}`: {true, false},
	} {
		logout, ok := parseLogoutDevices([]byte(body))
		if [2]bool{logout, ok} != want {
			t.Errorf("%s: got logout=%v ok=%v, want %v", body, logout, ok, want)
		}
	}
}

func FuzzParseLoginResponse(f *testing.F) {
	f.Add([]byte(`{"user_id":"@a:hs","device_id":"D","access_token":"t","expires_in_ms":1000}`))
	f.Add([]byte(`{"expires_in_ms":"soon"}`))
	f.Add([]byte(`{"expires_in_ms":1e30}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		lr, ok := parseLoginResponse(body)
		if !ok {
			return
		}
		// What was read survives a round trip through JSON.
		again, _ := json.Marshal(map[string]any{"user_id": lr.userID, "device_id": lr.deviceID,
			"access_token": lr.accessToken, "expires_in_ms": lr.expiresInMS})
		if lr2, ok := parseLoginResponse(again); !ok || lr2 != lr {
			t.Fatalf("%q read as %+v, re-read as %+v", body, lr, lr2)
		}
	})
}

func TestParseAdminUserUpdate(t *testing.T) {
	for body, want := range map[string]bool{
		`{"deactivated":true}`:                        true,
		`{"locked":true}`:                             true,
		`{"password":"x"}`:                            true,
		`{"password":"x","logout_devices":false}`:     false,
		`{"password":"x","logout_devices":"no"}`:      true,
		`{"displayname":"Alice","deactivated":false}`: false,
		`{"admin":true}`:                              false,
		`not json`:                                    true,
	} {
		if _, got := parseAdminUserUpdate([]byte(body)); got != want {
			t.Errorf("%s: revokes=%v, want %v", body, got, want)
		}
	}
}

func TestParseLoginResponse(t *testing.T) {
	lr, ok := parseLoginResponse([]byte(`{"user_id":"@a:hs","device_id":"D","access_token":"t","expires_in_ms":1000,"refresh_token":"r"}`))
	if !ok || lr != (loginResponse{"@a:hs", "D", "t", 1000}) {
		t.Errorf("got %+v %v", lr, ok)
	}
	for _, bad := range []string{`{"expires_in_ms":"soon"}`, `{"user_id":7}`, `nope`, `{"expires_in_ms":1e30}`} {
		if _, ok := parseLoginResponse([]byte(bad)); ok {
			t.Errorf("%s parsed", bad)
		}
	}
}

func TestParseWhoamiAndError(t *testing.T) {
	if u, d, ok := parseWhoami([]byte(`{"user_id":"@a:hs","device_id":"D","is_guest":false}`)); !ok || u != "@a:hs" || d != "D" {
		t.Errorf("whoami: %q %q %v", u, d, ok)
	}
	if u, d, ok := parseWhoami([]byte(`{"user_id":"@as:hs"}`)); !ok || u != "@as:hs" || d != "" {
		t.Errorf("device-less whoami: %q %q %v", u, d, ok)
	}
	for _, bad := range []string{`{"User_Id":"@a:hs"}`, `{"user_id":""}`, `{"user_id":"@a:hs","device_id":5}`, `[]`} {
		if _, _, ok := parseWhoami([]byte(bad)); ok {
			t.Errorf("%s parsed", bad)
		}
	}
	for body, want := range map[string]bool{
		`{"errcode":"M_UNKNOWN_TOKEN","soft_logout":true}`:   true,
		`{"errcode":"M_UNKNOWN_TOKEN","soft_logout":false}`:  false,
		`{"errcode":"M_UNKNOWN_TOKEN"}`:                      false,
		`{"errcode":"M_UNKNOWN_TOKEN","soft_logout":"true"}`: false,
	} {
		if code, soft, ok := parseError([]byte(body)); !ok || code != "M_UNKNOWN_TOKEN" || soft != want {
			t.Errorf("%s: %q %v %v", body, code, soft, ok)
		}
	}
}
