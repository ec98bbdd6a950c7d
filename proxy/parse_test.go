package proxy

import (
	"encoding/json"
	"net/http"
	"net/url"
	"reflect"
	"strings"
	"testing"
)

// TestClassify checks the table: which rows a request matches and with
// which parameters. want lists "METHOD path params…" of the matched rows.
func TestClassify(t *testing.T) {
	tests := []struct {
		method, path string
		whoami       bool
		want         []string
	}{
		{"GET", whoamiV3, true, nil},
		{"GET", whoamiR0, true, nil},
		{"GET", whoamiV3 + "/", false, nil},
		{"GET", "/_matrix/client/v3/account/%77hoami", false, nil},
		{"POST", "/_matrix/client/v3/logout", false, []string{"POST logout"}},
		{"POST", "/_matrix/client/r0/logout", false, []string{"POST logout"}},
		{"POST", "/_matrix/client/api/v1/logout", false, []string{"POST logout"}},
		{"POST", "/_matrix/client/unstable/logout", false, []string{"POST logout"}},
		{"POST", "/_matrix/client/v3/%6Cogout", false, []string{"POST logout"}},
		{"POST", "/_matrix/client//v3/logout/", false, []string{"POST logout"}},
		// A dot segment in a literal position: Synapse does not route it,
		// an intermediary that resolves dots would.
		{"POST", "/_matrix/client/v3/./logout", false, []string{"POST logout"}},
		{"POST", "/_matrix/client/v3/x/../logout", false, []string{"POST logout"}},
		{"GET", "/_matrix/client/v3/logout", false, nil},
		{"POST", "/_matrix/client/v3/logout/all", false, []string{"POST logout/all"}},
		{"DELETE", "/_matrix/client/v3/devices/ABC", false, []string{"DELETE devices/* ABC"}},
		{"DELETE", "/_matrix/client/v3/devices/A%2FB%20C", false, []string{"DELETE devices/* A/B C"}},
		// Synapse unquotes parameters and resolves no dots: these delete
		// the devices named ".." and ".".
		{"DELETE", "/_matrix/client/v3/devices/..", false, []string{"DELETE devices/* .."}},
		{"DELETE", "/_matrix/client/v3/devices/%2E%2E", false, []string{"DELETE devices/* .."}},
		{"DELETE", "/_matrix/client/v3/devices/%2e", false, []string{"DELETE devices/* ."}},
		{"DELETE", "/_matrix/client/v3/devices/%zz", false, []string{"DELETE devices/* %zz"}},
		// Both readings: the device "..", or (dots resolved) device B.
		{"DELETE", "/_matrix/client/v3/devices/A/../B", false, []string{"DELETE devices/* B"}},
		{"DELETE", "/_matrix/client/v3/devices/B/.", false, []string{"DELETE devices/* B"}},
		{"GET", "/_matrix/client/v3/devices/ABC", false, nil},
		{"PUT", "/_matrix/client/v3/devices/ABC", false, nil},
		{"POST", "/_matrix/client/v3/delete_devices", false, []string{"POST delete_devices"}},
		{"POST", "/_matrix/client/v3/account/password", false, []string{"POST account/password"}},
		{"POST", "/_matrix/client/v3/account/deactivate", false, []string{"POST account/deactivate"}},
		{"POST", "/_matrix/client/v3/login", false, []string{"POST login"}},
		{"POST", "/_matrix/client/v3/register", false, []string{"POST register"}},
		{"POST", "/_matrix/client/v3/refresh", false, []string{"POST refresh"}},
		{"POST", "/_matrix/client/v1/refresh", false, []string{"POST refresh"}},
		{"POST", "/_matrix/client/unstable/org.matrix.msc2918/refresh", false, []string{"POST refresh"}},
		{"PUT", "/_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device", false, []string{"PUT dehydrated_device"}},
		{"DELETE", "/_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device", false, []string{"DELETE dehydrated_device"}},
		{"GET", "/_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device", false, nil},
		{"PUT", "/_matrix/client/v1/admin/lock/%40a%3Ahs", false, []string{"PUT admin/lock/* @a:hs"}},
		{"PUT", "/_matrix/client/unstable/uk.timedout.msc4323/admin/lock/@a:hs", false, []string{"PUT admin/lock/* @a:hs"}},
		{"POST", "/_synapse/client/oidc/backchannel_logout", false, []string{"POST oidc/backchannel_logout"}},
		{"POST", "/_matrix/client/v3/rooms/!r:hs/send/logout", false, nil},
		{"POST", "/_matrix/media/v3/logout", false, nil},
		{"POST", "/logout", false, nil},
		{"DELETE", "/_synapse/admin/v2/users/%40a%3Ahs/devices/D1", false, []string{"DELETE users/*/devices/* @a:hs D1"}},
		{"POST", "/_synapse/admin/v2/users/@a:hs/delete_devices", false, []string{"POST users/*/delete_devices @a:hs"}},
		{"POST", "/_synapse/admin/v1/deactivate/@a:hs", false, []string{"POST deactivate/* @a:hs"}},
		{"POST", "/_synapse/admin/v1/reset_password/@a:hs", false, []string{"POST reset_password/* @a:hs"}},
		{"PUT", "/_synapse/admin/v2/users/@a:hs", false, []string{"PUT users/* @a:hs"}},
		{"GET", "/_synapse/admin/v2/users/@a:hs", false, nil},
		{"PUT", "/_synapse/admin/v1/users/@a:hs/admin", false, []string{"PUT users/*/admin @a:hs"}},
		{"GET", "/_synapse/admin/v1/users/@a:hs/admin", false, nil},
		{"PUT", "/_matrix/client/v3/rooms/!r:hs/send/m.room.message/1", false, nil},
		{"POST", "/_synapse/mas/delete_device", false, []string{"POST delete_device"}},
		{"POST", "/_synapse/mas/sync_devices/", false, []string{"POST sync_devices"}},
		{"POST", "/_synapse//mas/%64elete_user", false, []string{"POST delete_user"}},
		{"POST", "/_synapse/mas/provision_user", false, []string{"POST provision_user"}},
		{"POST", "/_synapse/mas/reactivate_user", false, []string{"POST reactivate_user"}},
		{"POST", "/_synapse/mas/upsert_device", false, nil},
		{"POST", "/_synapse/mas/set_displayname", false, nil},
		{"GET", "/_synapse/mas/query_user", false, nil},
		{"POST", "/_synapse/mas/v1/delete_device", false, nil},
	}
	for _, tt := range tests {
		r := &http.Request{Method: tt.method, URL: &url.URL{Path: mustUnescape(t, tt.path), RawPath: tt.path}}
		rt := classify(r)
		var got []string
		for _, m := range rt.matches {
			s := m.route.method + " " + m.route.path
			for _, p := range m.params {
				if p != "" {
					s += " " + p
				}
			}
			got = append(got, s)
		}
		if rt.whoami != tt.whoami || strings.Join(got, "|") != strings.Join(tt.want, "|") {
			t.Errorf("%s %s: got whoami=%v %q, want whoami=%v %q", tt.method, tt.path, rt.whoami, got, tt.whoami, tt.want)
		}
	}
}

func mustUnescape(t *testing.T, p string) string {
	t.Helper()
	u, err := url.PathUnescape(p)
	if err != nil {
		return p
	}
	return u
}

func TestSynapseQuery(t *testing.T) {
	tests := []struct {
		raw  string
		want url.Values
	}{
		{"a=1&a=2", url.Values{"a": {"1", "2"}}},
		{"a=1;b=2", url.Values{"a": {"1"}, "b": {"2"}}},
		{"x=%zz&access_token=T", url.Values{"x": {"%zz"}, "access_token": {"T"}}},
		{"user_id=&flag&a+b=c+d", url.Values{"user_id": {""}, "a b": {"c d"}}},
		{"k=%41%4", url.Values{"k": {"A%4"}}},
		{"", url.Values{}},
	}
	for _, tt := range tests {
		if got := synapseQuery(tt.raw); !reflect.DeepEqual(got, tt.want) {
			t.Errorf("synapseQuery(%q) = %v, want %v", tt.raw, got, tt.want)
		}
	}
}

// TestReadAuth checks the credentials against what Synapse 1.163 takes
// (synapse/api/auth/base.py get_access_token_from_request).
func TestReadAuth(t *testing.T) {
	tests := []struct {
		name     string
		authz    []string
		query    string
		state    authState
		token    string
		masqUser string
		masqOdd  bool
		credsOK  bool
	}{
		{"header", []string{"Bearer T"}, "", authToken, "T", "", false, true},
		{"query", nil, "access_token=T", authToken, "T", "", false, true},
		{"first query value", nil, "access_token=T&access_token=U", authToken, "T", "", false, true},
		{"semicolon", nil, "access_token=T;access_token=U", authToken, "T", "", false, true},
		{"odd query elsewhere", nil, "x=%zz&access_token=T", authToken, "T", "", false, true},
		{"mixing", []string{"Bearer T"}, "access_token=U", authInvalid, "T", "", false, false},
		{"two headers", []string{"Bearer T", "Bearer U"}, "", authInvalid, "T", "", false, false},
		{"lower-case bearer", []string{"bearer T"}, "", authInvalid, "bearer T", "", false, false},
		{"two spaces", []string{"Bearer  T"}, "", authInvalid, " T", "", false, false},
		{"empty query token", nil, "access_token=", authInvalid, "", "", false, false},
		{"none", nil, "user_id=@a:hs", authNone, "", "@a:hs", false, false},
		{"masquerade", nil, "access_token=T&user_id=@a:hs&user_id=@b:hs", authToken, "T", "@a:hs", false, true},
		{"empty masquerade", []string{"Bearer T"}, "user_id=", authToken, "T", "", true, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := &http.Request{Header: http.Header{}, URL: &url.URL{RawQuery: tt.query}}
			if tt.authz != nil {
				r.Header["Authorization"] = tt.authz
			}
			a := readAuth(r)
			m, odd := a.masquerade()
			if a.state != tt.state || a.token != tt.token || m.UserID != tt.masqUser || odd != tt.masqOdd {
				t.Errorf("readAuth: state %d token %q masq %q odd %v; want %d %q %q %v", a.state, a.token, m.UserID, odd,
					tt.state, tt.token, tt.masqUser, tt.masqOdd)
			}
			c, ok := extractCredentials(r)
			if ok != tt.credsOK || (ok && c.token != tt.token) {
				t.Errorf("extractCredentials: %q %v, want ok=%v", c.token, ok, tt.credsOK)
			}
		})
	}
}

func FuzzClassify(f *testing.F) {
	for _, s := range []string{whoamiV3, "/_matrix/client/v3/devices/%2F..", "/_matrix/client/../../logout", "//", "%zz",
		"/_matrix/client/v3/devices/a/../b", "/_synapse/admin/v1/deactivate/%40a"} {
		f.Add("POST", s)
		f.Add("DELETE", s)
		f.Add("PUT", s)
	}
	f.Fuzz(func(t *testing.T, method, rawPath string) {
		u, err := url.Parse(rawPath)
		if err != nil {
			return
		}
		rt := classify(&http.Request{Method: method, URL: u})
		if rt.whoami && method != "GET" {
			t.Errorf("whoami answered for %s", method)
		}
		if rt.name >= numRoutes {
			t.Errorf("route name out of range: %d", rt.name)
		}
		for _, m := range rt.matches {
			if m.route.method != method {
				t.Errorf("%s matched a %s row", method, m.route.method)
			}
		}
		// Every parameter Synapse would see is one the proxy names:
		// Synapse unquotes the raw segment in the parameter's place.
		segs := strings.Split(u.EscapedPath(), "/")
		if len(segs) == 6 && segs[1] == "_matrix" && segs[2] == "client" && segs[4] == "devices" && method == "DELETE" && segs[5] != "" {
			want := unquote(segs[5], false)
			found := false
			for _, m := range rt.matches {
				found = found || m.params[0] == want
			}
			if !found {
				t.Errorf("DELETE %s: device %q not among %+v", rawPath, want, rt.matches)
			}
		}
	})
}

// FuzzExtractCredentials feeds arbitrary headers and queries to the token
// extraction. It must never panic, and whatever it accepts must be the
// token Synapse would take: the one header's, or the first query value.
func FuzzExtractCredentials(f *testing.F) {
	f.Add("Bearer syt_abc", "")
	f.Add("", "access_token=syt_abc&user_id=@a:hs")
	f.Add("Bearer syt_abc", "access_token=syt_abc")
	f.Add("bearer x", "device_id=&user_id=x")
	f.Add("Bearer \x00", "access_token=%00")
	f.Add("", "access_token=a;access_token=b&user_id=%zz")
	f.Fuzz(func(t *testing.T, authz, rawQuery string) {
		r := &http.Request{Header: http.Header{}, URL: &url.URL{RawQuery: rawQuery}}
		if authz != "" {
			r.Header.Set("Authorization", authz)
		}
		c, ok := extractCredentials(r)
		if !ok {
			return
		}
		if !validToken(c.token) {
			t.Fatalf("accepted an invalid token %q", c.token)
		}
		q := synapseQuery(rawQuery)
		if authz != "" {
			if authz != "Bearer "+c.token || len(q["access_token"]) > 0 {
				t.Fatalf("header %q, query %q: took %q", authz, rawQuery, c.token)
			}
		} else if qt := q["access_token"]; len(qt) == 0 || qt[0] != c.token {
			t.Fatalf("query %q: took %q", rawQuery, c.token)
		}
		// Masquerade parameters are the first values, never empty.
		for name, got := range map[string]string{"user_id": c.masq.UserID, "device_id": c.masq.DeviceID,
			"org.matrix.msc3202.device_id": c.masq.MSC3202DeviceID} {
			vs := q[name]
			if (len(vs) == 0 && got != "") || (len(vs) > 0 && (vs[0] != got || got == "")) {
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
		// Admin status is cached by forward-auth's admin=true.
		`{"admin":true}`:  true,
		`{"admin":false}`: true,
		`not json`:        true,
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

// TestReplaceInvalidUTF8 against Python 3's urllib.parse.unquote:
// python3 -c 'from urllib.parse import unquote; print(repr(unquote("%E2%82A")))'
func TestReplaceInvalidUTF8(t *testing.T) {
	for raw, want := range map[string]string{
		"%FF":            "\uFFFD",
		"%FF%FF":         "\uFFFD\uFFFD",
		"%E2%82A":        "\uFFFDA",
		"%E2%82%AC":      "€",
		"%F0%9F%98":      "\uFFFD",
		"%ED%A0%80":      "\uFFFD\uFFFD\uFFFD",
		"%C0%AF":         "\uFFFD\uFFFD",
		"a%F4%90%80%80b": "a\uFFFD\uFFFD\uFFFD\uFFFDb",
		"%E0%80%80":      "\uFFFD\uFFFD\uFFFD",
	} {
		if got := replaceInvalidUTF8(unquote(raw, false)); got != want {
			t.Errorf("%s: got %q, want %q", raw, got, want)
		}
	}
}

// FuzzSynapseQuery: Twisted's parse_qs never fails, so neither may the
// proxy's reading of it, and every value it returns comes from a pair with
// an '=' in the raw query.
func FuzzSynapseQuery(f *testing.F) {
	for _, s := range []string{"a=1&a=2", "x=%zz;access_token=T", "=&;==", "user_id=&flag", "%E2%82A=%FF+"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, raw string) {
		q := synapseQuery(raw)
		n := 0
		for _, vs := range q {
			n += len(vs)
		}
		if pairs := strings.Count(raw, "="); n > pairs {
			t.Fatalf("%q: %d values from %d '='", raw, n, pairs)
		}
	})
}

func FuzzParseLocked(f *testing.F) {
	for _, s := range []string{`{"locked":true}`, `{"locked":false}`, `{"Locked":false}`, `{"locked":null}`, `[]`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		// Anything but a JSON object whose "locked" is false locks, for
		// the proxy: it invalidates more, never less.
		locked, ok := parseLocked(body)
		var m map[string]any
		if json.Unmarshal(body, &m) == nil && m["locked"] == false && (!ok || locked) {
			t.Fatalf("%s: read as locked", body)
		}
		if ok && !locked && (json.Unmarshal(body, &m) != nil || m["locked"] != false) {
			t.Fatalf("%s: read as unlocked", body)
		}
	})
}
