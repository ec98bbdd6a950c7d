package deploy

import (
	"encoding/json"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"
)

// The forward-auth examples of deploy/forward-auth: the Kubernetes objects
// decode strictly (Traefik's CRDs into the few fields of theirs this
// repository relies on, written out below), Envoy's bootstrap into the
// fields the proxy relies on (Envoy is not packaged in Debian), the
// Caddyfile adapts with `caddy adapt` and the nginx server block passes
// `nginx -t`. The end-to-end tests of cmd/matrix-auth-proxy run the last two.

// identityHeaders are what the proxy answers an allowed request with.
var identityHeaders = []string{"X-Matrix-User-ID", "X-Matrix-Device-ID", "X-Matrix-Is-Guest"}

// splitDocs splits a multi-document YAML file.
func splitDocs(s string) []string {
	var docs []string
	for d := range strings.SplitSeq(s, "\n---\n") {
		if strings.TrimSpace(d) != "" {
			docs = append(docs, d)
		}
	}
	return docs
}

// checkAuthURL checks an auth URL points at the proxy's /auth with a policy
// the proxy reads (only its parameters).
func checkAuthURL(t *testing.T, raw string) {
	t.Helper()
	u, err := url.Parse(raw)
	if err != nil || u.Path != "/auth" || u.Port() != "8081" {
		t.Errorf("auth URL %q: want http://…:8081/auth?{policy}", raw)
		return
	}
	q, err := url.ParseQuery(u.RawQuery)
	if err != nil {
		t.Errorf("auth URL %q: %v", raw, err)
	}
	for k := range q {
		if !slices.Contains([]string{"guests", "users", "admin"}, k) {
			t.Errorf("auth URL %q: %q is no policy parameter", raw, k)
		}
	}
}

func TestForwardAuthIngressNginx(t *testing.T) {
	docs := splitDocs(readFile(t, "deploy", "forward-auth", "ingress-nginx.yaml"))
	if len(docs) != 2 {
		t.Fatalf("%d documents, want a Service and an Ingress", len(docs))
	}
	var svc corev1.Service
	if err := yaml.UnmarshalStrict([]byte(docs[0]), &svc); err != nil || svc.Kind != "Service" {
		t.Fatalf("Service: %v (%s)", err, svc.Kind)
	}
	if len(svc.Spec.Ports) != 1 || svc.Spec.Ports[0].Port != 8081 || svc.Spec.Ports[0].TargetPort.String() != "auth" {
		t.Errorf("Service ports: %+v", svc.Spec.Ports)
	}
	var ing networkingv1.Ingress
	if err := yaml.UnmarshalStrict([]byte(docs[1]), &ing); err != nil || ing.Kind != "Ingress" {
		t.Fatalf("Ingress: %v (%s)", err, ing.Kind)
	}
	a := ing.Annotations
	checkAuthURL(t, a["nginx.ingress.kubernetes.io/auth-url"])
	if !strings.HasPrefix(a["nginx.ingress.kubernetes.io/auth-url"], "http://"+svc.Name+"."+svc.Namespace+".svc") {
		t.Errorf("auth-url %q is not the Service %s/%s", a["nginx.ingress.kubernetes.io/auth-url"], svc.Namespace, svc.Name)
	}
	if got := strings.Split(a["nginx.ingress.kubernetes.io/auth-response-headers"], ","); !slices.Equal(got, identityHeaders) {
		t.Errorf("auth-response-headers %q, want %q", got, identityHeaders)
	}
}

// The fields of Traefik's CRDs (traefik.io/v1alpha1) the example uses.
type traefikMiddleware struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`
	Spec              struct {
		ForwardAuth struct {
			Address             string   `json:"address"`
			AuthResponseHeaders []string `json:"authResponseHeaders"`
		} `json:"forwardAuth"`
	} `json:"spec"`
}

type traefikIngressRoute struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`
	Spec              struct {
		EntryPoints []string `json:"entryPoints"`
		Routes      []struct {
			Match       string `json:"match"`
			Kind        string `json:"kind"`
			Middlewares []struct {
				Name string `json:"name"`
			} `json:"middlewares"`
			Services []struct {
				Name string `json:"name"`
				Port int    `json:"port"`
			} `json:"services"`
		} `json:"routes"`
	} `json:"spec"`
}

func TestForwardAuthTraefik(t *testing.T) {
	docs := splitDocs(readFile(t, "deploy", "forward-auth", "traefik.yaml"))
	if len(docs) != 2 {
		t.Fatalf("%d documents, want a Middleware and an IngressRoute", len(docs))
	}
	var mw traefikMiddleware
	if err := yaml.UnmarshalStrict([]byte(docs[0]), &mw); err != nil || mw.Kind != "Middleware" || mw.APIVersion != "traefik.io/v1alpha1" {
		t.Fatalf("Middleware: %v (%s %s)", err, mw.APIVersion, mw.Kind)
	}
	checkAuthURL(t, mw.Spec.ForwardAuth.Address)
	if !slices.Equal(mw.Spec.ForwardAuth.AuthResponseHeaders, identityHeaders) {
		t.Errorf("authResponseHeaders %q", mw.Spec.ForwardAuth.AuthResponseHeaders)
	}
	var ir traefikIngressRoute
	if err := yaml.UnmarshalStrict([]byte(docs[1]), &ir); err != nil || ir.Kind != "IngressRoute" {
		t.Fatalf("IngressRoute: %v (%s)", err, ir.Kind)
	}
	for _, r := range ir.Spec.Routes {
		if len(r.Middlewares) != 1 || r.Middlewares[0].Name != mw.Name {
			t.Errorf("route %q does not use the middleware %q", r.Match, mw.Name)
		}
	}
}

// envoyBootstrap is the part of Envoy's bootstrap the proxy relies on.
type envoyBootstrap struct {
	StaticResources struct {
		Listeners []struct {
			FilterChains []struct {
				Filters []struct {
					Name        string `json:"name"`
					TypedConfig struct {
						UseRemoteAddress bool `json:"use_remote_address"`
						HTTPFilters      []struct {
							Name        string          `json:"name"`
							TypedConfig json.RawMessage `json:"typed_config"`
						} `json:"http_filters"`
					} `json:"typed_config"`
				} `json:"filters"`
			} `json:"filter_chains"`
		} `json:"listeners"`
		Clusters []struct {
			Name string `json:"name"`
		} `json:"clusters"`
	} `json:"static_resources"`
}

type envoyMatchers struct {
	Patterns []struct {
		Exact string `json:"exact"`
	} `json:"patterns"`
}

func (m envoyMatchers) exact() []string {
	var out []string
	for _, p := range m.Patterns {
		out = append(out, p.Exact)
	}
	return out
}

type envoyExtAuthz struct {
	Type             string `json:"@type"`
	FailureModeAllow bool   `json:"failure_mode_allow"`
	HTTPService      struct {
		ServerURI struct {
			URI     string `json:"uri"`
			Cluster string `json:"cluster"`
		} `json:"server_uri"`
		PathPrefix           string `json:"path_prefix"`
		AuthorizationRequest struct {
			AllowedHeaders envoyMatchers `json:"allowed_headers"`
		} `json:"authorization_request"`
		AuthorizationResponse struct {
			AllowedUpstreamHeaders envoyMatchers `json:"allowed_upstream_headers"`
			AllowedClientHeaders   envoyMatchers `json:"allowed_client_headers"`
		} `json:"authorization_response"`
	} `json:"http_service"`
}

func TestForwardAuthEnvoy(t *testing.T) {
	var bs envoyBootstrap
	if err := yaml.Unmarshal([]byte(readFile(t, "deploy", "forward-auth", "envoy.yaml")), &bs); err != nil {
		t.Fatal(err)
	}
	var found int
	for _, l := range bs.StaticResources.Listeners {
		for _, fc := range l.FilterChains {
			for _, f := range fc.Filters {
				for _, hf := range f.TypedConfig.HTTPFilters {
					if hf.Name != "envoy.filters.http.ext_authz" {
						continue
					}
					found++
					if !f.TypedConfig.UseRemoteAddress {
						t.Error("use_remote_address is off: X-Forwarded-For would not name the client")
					}
					var ea envoyExtAuthz
					if err := json.Unmarshal(hf.TypedConfig, &ea); err != nil {
						t.Fatal(err)
					}
					checkEnvoyExtAuthz(t, ea, bs)
				}
			}
		}
	}
	if found != 1 {
		t.Errorf("%d ext_authz filters, want 1", found)
	}
}

func checkEnvoyExtAuthz(t *testing.T, ea envoyExtAuthz, bs envoyBootstrap) {
	t.Helper()
	hs := ea.HTTPService
	if ea.Type != "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz" || ea.FailureModeAllow {
		t.Errorf("ext_authz %q, failure_mode_allow %v: want v3 and false (an outage must never let requests pass)", ea.Type, ea.FailureModeAllow)
	}
	// /envoy/{policy}: one segment, "-" or a query of policy parameters.
	policy, ok := strings.CutPrefix(hs.PathPrefix, "/envoy/")
	if !ok || policy == "" || strings.Contains(policy, "/") {
		t.Errorf("path_prefix %q: want /envoy/{policy}", hs.PathPrefix)
	} else if policy != "-" {
		checkAuthURL(t, "http://h:8081/auth?"+policy)
	}
	if !slices.ContainsFunc(bs.StaticResources.Clusters, func(c struct {
		Name string `json:"name"`
	}) bool {
		return c.Name == hs.ServerURI.Cluster
	}) {
		t.Errorf("server_uri's cluster %q is not defined", hs.ServerURI.Cluster)
	}
	if !slices.Contains(hs.AuthorizationRequest.AllowedHeaders.exact(), "x-forwarded-for") {
		t.Error("x-forwarded-for is not sent: the proxy would rate-limit Envoy, not the client")
	}
	var want []string
	for _, h := range identityHeaders {
		want = append(want, strings.ToLower(h))
	}
	if got := hs.AuthorizationResponse.AllowedUpstreamHeaders.exact(); !slices.Equal(got, want) {
		t.Errorf("allowed_upstream_headers %q, want %q", got, want)
	}
	if !slices.Contains(hs.AuthorizationResponse.AllowedClientHeaders.exact(), "www-authenticate") {
		t.Error("a 401's WWW-Authenticate does not reach the client")
	}
}

// toolOrSkip finds a server binary from a Debian package, or skips.
func toolOrSkip(t *testing.T, name string) string {
	t.Helper()
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	if p := filepath.Join("/usr/sbin", name); fileExists(p) {
		return p
	}
	unavailable(t, "%s is not installed (apt-get install %s)", name, name)
	return ""
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

func TestForwardAuthCaddyfileAdapts(t *testing.T) {
	caddy := toolOrSkip(t, "caddy")
	dir := t.TempDir()
	cmd := exec.Command(caddy, "adapt", "--config", repoPath(t, "deploy", "forward-auth", "Caddyfile"), "--adapter", "caddyfile")
	cmd.Env = []string{"HOME=" + dir, "XDG_DATA_HOME=" + dir, "XDG_CONFIG_HOME=" + dir}
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("caddy adapt: %v\n%s", err, out)
	}
	// Every auth request's URI carries a policy of its own: without a
	// query Caddy passes the original request's on.
	var uris []string
	var walk func(v any)
	walk = func(v any) {
		switch v := v.(type) {
		case map[string]any:
			if u, ok := v["uri"].(string); ok && strings.HasPrefix(u, "/auth") {
				uris = append(uris, u)
			}
			for _, x := range v {
				walk(x)
			}
		case []any:
			for _, x := range v {
				walk(x)
			}
		}
	}
	var cfg any
	if err := json.Unmarshal(out, &cfg); err != nil {
		t.Fatalf("caddy adapt's output: %v", err)
	}
	walk(cfg)
	if len(uris) != 3 {
		t.Errorf("auth URIs %q, want 3", uris)
	}
	for _, u := range uris {
		if !strings.Contains(u, "?") {
			t.Errorf("auth URI %q has no query: Caddy would pass the client's on as the policy", u)
		}
		checkAuthURL(t, "http://h:8081"+u)
	}
}

func TestForwardAuthNginxConfigTests(t *testing.T) {
	nginx := toolOrSkip(t, "nginx")
	dir := t.TempDir()
	main := fmt.Sprintf(`worker_processes 1;
pid %[1]s/nginx.pid;
error_log %[1]s/error.log;
events { worker_connections 64; }
http {
    client_body_temp_path %[1]s/body;
    proxy_temp_path %[1]s/proxy;
    fastcgi_temp_path %[1]s/fastcgi;
    uwsgi_temp_path %[1]s/uwsgi;
    scgi_temp_path %[1]s/scgi;
    access_log off;
    include %[2]s;
}
`, dir, repoPath(t, "deploy", "forward-auth", "nginx.conf"))
	conf := filepath.Join(dir, "nginx.conf")
	if err := os.WriteFile(conf, []byte(main), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(nginx, "-t", "-p", dir, "-c", conf, "-e", filepath.Join(dir, "error.log")).CombinedOutput(); err != nil {
		t.Fatalf("nginx -t: %v\n%s", err, out)
	}
	site := readFile(t, "deploy", "forward-auth", "nginx.conf")
	for _, h := range identityHeaders {
		if !strings.Contains(site, "proxy_set_header "+h) {
			t.Errorf("the protected service does not get %s", h)
		}
	}
	for _, line := range strings.Split(site, "\n") {
		if f := strings.Fields(line); len(f) == 2 && f[0] == "proxy_pass" && strings.Contains(f[1], ":8081") {
			checkAuthURL(t, strings.TrimSuffix(f[1], ";"))
		}
	}
}
