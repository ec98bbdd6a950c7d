package deploy

// matrix-auth-proxy in front of the Element Server Suite: the ESS chart
// (../shared/ess-helm/charts/matrix-stack, a copy of element-hq/ess-helm)
// rendered offline with helm/ess/matrix-stack-values.yaml, and this chart
// with helm/ess/matrix-auth-proxy-values.yaml. The checks follow requests
// through the rendered objects (the Ingress, HAProxy's configuration and
// path maps, MAS's configuration, the proxy's UPSTREAM_URL) and assert where
// they end up.

import (
	"fmt"
	"net"
	"net/url"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/labels"
	"sigs.k8s.io/yaml"
)

const (
	essRelease   = "ess"
	essNamespace = "ess"
	proxyRelease = "matrix-auth-proxy"
)

// essChartDir is the shared copy of ESS's chart, beside the repository.
func essChartDir(t *testing.T) string {
	t.Helper()
	dir := repoPath(t, "..", "shared", "ess-helm", "charts", "matrix-stack")
	if _, err := os.Stat(dir + "/Chart.yaml"); err != nil {
		unavailable(t, "the ESS chart is not at %s (CI copies shared/ beside the clone)", dir)
	}
	return dir
}

// essObjects is one render of matrix-stack, decoded where the checks look.
type essObjects struct {
	ingresses   []networkingv1.Ingress
	services    []corev1.Service
	configMaps  []corev1.ConfigMap
	deployments []appsv1.Deployment
	sets        []appsv1.StatefulSet
	monitors    []monitoringv1.ServiceMonitor
}

// essVariant is one ESS deployment the wiring is checked against.
type essVariant struct {
	name string
	// workers: Synapse with the workers of ESS's CI worker example (and so
	// ESS's Redis), the proxy with matrix-auth-proxy-workers-values.yaml.
	workers bool
}

var essVariants = []essVariant{{name: "default"}, {name: "workers", workers: true}}

type essRenderKey struct {
	variant   essVariant
	withProxy bool
}

var essRenders = map[essRenderKey]*essObjects{}

// renderESS renders matrix-stack from its complete CI example (plus the
// workers of its worker example for that variant), with the proxy's values
// file on top when withProxy.
func renderESS(t *testing.T, v essVariant, withProxy bool) *essObjects {
	t.Helper()
	if o, ok := essRenders[essRenderKey{v, withProxy}]; ok {
		return o
	}
	dir := essChartDir(t)
	vals := valuesFile(t, dir+"/ci/example-default-enabled-components-values.yaml")
	if v.workers {
		workers := valuesFile(t, dir+"/ci/synapse-worker-example-values.yaml")["synapse"].(map[string]any)["workers"].(map[string]any)
		// The example runs without MAS; with MAS, Synapse does no SSO.
		delete(workers, "sso-login")
		vals = mergeValues(vals, map[string]any{"synapse": map[string]any{"workers": workers}})
	}
	if withProxy {
		vals = mergeValues(vals, valuesFile(t, "helm/ess/matrix-stack-values.yaml"))
	}
	rel, err := helmInstall(t, loadChart(t, dir), essRelease, essNamespace, vals, prometheusOperatorAPIs)
	if err != nil {
		t.Fatalf("render matrix-stack (with the proxy: %v): %v", withProxy, err)
	}
	o := &essObjects{}
	for _, js := range manifestObjects(t, rel.Manifest) {
		var meta struct{ APIVersion, Kind string }
		if err := yaml.Unmarshal(js, &meta); err != nil {
			t.Fatal(err)
		}
		var into any
		switch meta.APIVersion + "/" + meta.Kind {
		case "networking.k8s.io/v1/Ingress":
			o.ingresses = append(o.ingresses, networkingv1.Ingress{})
			into = &o.ingresses[len(o.ingresses)-1]
		case "v1/Service":
			o.services = append(o.services, corev1.Service{})
			into = &o.services[len(o.services)-1]
		case "v1/ConfigMap":
			o.configMaps = append(o.configMaps, corev1.ConfigMap{})
			into = &o.configMaps[len(o.configMaps)-1]
		case "apps/v1/Deployment":
			o.deployments = append(o.deployments, appsv1.Deployment{})
			into = &o.deployments[len(o.deployments)-1]
		case "apps/v1/StatefulSet":
			o.sets = append(o.sets, appsv1.StatefulSet{})
			into = &o.sets[len(o.sets)-1]
		case "monitoring.coreos.com/v1/ServiceMonitor":
			o.monitors = append(o.monitors, monitoringv1.ServiceMonitor{})
			into = &o.monitors[len(o.monitors)-1]
		default:
			continue
		}
		if err := yaml.Unmarshal(js, into); err != nil {
			t.Fatalf("%s: %v", meta.Kind, err)
		}
	}
	essRenders[essRenderKey{v, withProxy}] = o
	return o
}

func (o *essObjects) configMapData(t *testing.T, name, key string) string {
	t.Helper()
	for _, cm := range o.configMaps {
		if cm.Name == name {
			if v, ok := cm.Data[key]; ok {
				return v
			}
		}
	}
	t.Fatalf("no ConfigMap %s with key %s", name, key)
	return ""
}

func (o *essObjects) service(name string) *corev1.Service {
	for i := range o.services {
		if o.services[i].Name == name {
			return &o.services[i]
		}
	}
	return nil
}

// workloadOf names the Deployment or StatefulSet whose pods svc selects.
func (o *essObjects) workloadOf(svc *corev1.Service) string {
	sel := labels.SelectorFromSet(svc.Spec.Selector)
	for _, d := range o.deployments {
		if sel.Matches(labels.Set(d.Spec.Template.Labels)) {
			return "Deployment/" + d.Name
		}
	}
	for _, s := range o.sets {
		if sel.Matches(labels.Set(s.Spec.Template.Labels)) {
			return "StatefulSet/" + s.Name
		}
	}
	return ""
}

// hop is a place a request goes: a Service and its port (by name or number).
type hop struct{ service, port string }

func (h hop) String() string { return h.service + ":" + h.port }

// normal names a Service port by number, as a URL does.
func (o *essObjects) normal(h hop) hop {
	if svc := o.service(h.service); svc != nil {
		for _, p := range svc.Spec.Ports {
			if p.Name == h.port {
				return hop{h.service, fmt.Sprint(p.Port)}
			}
		}
	}
	return h
}

// ingressRoute is where the Ingress for host sends path: the longest Prefix.
func (o *essObjects) ingressRoute(t *testing.T, host, path string) hop {
	t.Helper()
	best, found := -1, hop{}
	for _, ing := range o.ingresses {
		for _, rule := range ing.Spec.Rules {
			if rule.Host != host || rule.HTTP == nil {
				continue
			}
			for _, p := range rule.HTTP.Paths {
				if p.PathType == nil || *p.PathType != networkingv1.PathTypePrefix {
					t.Fatalf("Ingress %s: path %s is not Prefix; teach ingressRoute", ing.Name, p.Path)
				}
				pre := strings.TrimSuffix(p.Path, "/")
				if (path == pre || strings.HasPrefix(path, pre+"/")) && len(pre) > best {
					port := p.Backend.Service.Port.Name
					if port == "" {
						port = fmt.Sprint(p.Backend.Service.Port.Number)
					}
					best, found = len(pre), hop{p.Backend.Service.Name, port}
				}
			}
		}
	}
	if best < 0 {
		t.Fatalf("no Ingress path for %s%s", host, path)
	}
	return found
}

// haproxy is ESS's HAProxy configuration, enough of it to route a request
// the way its synapse-http-in frontend does.
type haproxy struct {
	frontend []string          // the synapse-http-in lines, in order
	servers  map[string]hop    // backend → where its server-template points
	maps     map[string]string // path_map_file, path_map_file_get contents
	dupes    []string          // backends declared more than once
}

var (
	serverTemplate = regexp.MustCompile(`^server-template \S+ \d+ _([^.]+)\._tcp\.([^.]+)\.` + essNamespace + `\.svc\.`)
	aclPath        = regexp.MustCompile(`^acl (\S+) (path_beg|path) (\S+)$`)
	useBackendIf   = regexp.MustCompile(`^use_backend (\S+) if (\S+)$`)
)

func parseHAProxy(t *testing.T, o *essObjects) *haproxy {
	t.Helper()
	cfg := o.configMapData(t, essRelease+"-haproxy", "haproxy.cfg")
	h := &haproxy{servers: map[string]hop{}, maps: map[string]string{}}
	for _, f := range []string{"path_map_file", "path_map_file_get"} {
		h.maps[f] = o.configMapData(t, essRelease+"-synapse-haproxy", f)
	}
	section, backend := "", ""
	for _, line := range strings.Split(cfg, "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if f := strings.Fields(line); len(f) == 2 && (f[0] == "frontend" || f[0] == "backend") {
			section, backend = line, ""
			if f[0] == "backend" {
				backend = f[1]
				if _, dup := h.servers[backend]; dup {
					h.dupes = append(h.dupes, backend)
				}
				h.servers[backend] = hop{}
			}
			continue
		}
		if strings.Fields(line)[0] == "global" || strings.Fields(line)[0] == "defaults" || strings.Fields(line)[0] == "resolvers" {
			section, backend = line, ""
			continue
		}
		switch {
		case section == "frontend synapse-http-in":
			h.frontend = append(h.frontend, line)
		case backend != "":
			if m := serverTemplate.FindStringSubmatch(line); m != nil {
				h.servers[backend] = hop{m[2], m[1]}
			}
		}
	}
	if len(h.frontend) == 0 {
		t.Fatal("haproxy.cfg has no frontend synapse-http-in")
	}
	return h
}

// mapBackend is what map_reg(file, main) gives for path.
func (h *haproxy) mapBackend(t *testing.T, file, path string) (string, bool) {
	t.Helper()
	for _, line := range strings.Split(h.maps[file], "\n") {
		f := strings.Fields(line)
		if len(f) != 2 || strings.HasPrefix(line, "#") {
			continue
		}
		re, err := regexp.Compile(f[0])
		if err != nil {
			t.Fatalf("%s: %q: %v", file, f[0], err)
		}
		if re.MatchString(path) {
			return f[1], true
		}
	}
	return "", false
}

// route is where synapse-http-in sends a non-OPTIONS request, with every
// server up: the first use_backend whose path ACL matches, else the backend
// the path maps choose.
func (h *haproxy) route(t *testing.T, method, path string) hop {
	t.Helper()
	acls := map[string][]func(string) bool{}
	backend := ""
	for _, line := range h.frontend {
		if m := aclPath.FindStringSubmatch(line); m != nil {
			p := m[3]
			if m[2] == "path_beg" {
				acls[m[1]] = append(acls[m[1]], func(s string) bool { return strings.HasPrefix(s, p) })
			} else {
				acls[m[1]] = append(acls[m[1]], func(s string) bool { return s == p })
			}
			continue
		}
		if m := useBackendIf.FindStringSubmatch(line); m != nil {
			for _, match := range acls[m[2]] {
				if match(path) {
					backend = m[1]
				}
			}
			if backend != "" {
				break
			}
			continue
		}
		if line == "use_backend synapse-%[var(req.backend)]" {
			b, ok := "", false
			if method == "GET" {
				b, ok = h.mapBackend(t, "path_map_file_get", path)
			}
			if !ok {
				if b, ok = h.mapBackend(t, "path_map_file", path); !ok {
					b = "main"
				}
			}
			backend = "synapse-" + b
			break
		}
	}
	to, ok := h.servers[backend]
	if !ok || to.service == "" {
		t.Fatalf("HAProxy sends %s %s to backend %q, which has no server-template this test understands", method, path, backend)
	}
	return to
}

// essWiring is both sides rendered: ESS with its values file, the proxy
// with its own.
type essWiring struct {
	ess      *essObjects
	haproxy  *haproxy
	proxy    *chartObjects
	proxyEnv map[string]string
	upstream hop
}

func loadESSWiring(t *testing.T, v essVariant) *essWiring {
	t.Helper()
	w := &essWiring{ess: renderESS(t, v, true)}
	w.haproxy = parseHAProxy(t, w.ess)
	vals := valuesFile(t, "helm/ess/matrix-auth-proxy-values.yaml")
	if v.workers {
		vals = mergeValues(vals, valuesFile(t, "helm/ess/matrix-auth-proxy-workers-values.yaml"))
	}
	rel, err := helmInstall(t, loadChart(t, chartDir), proxyRelease, essNamespace, vals, prometheusOperatorAPIs)
	if err != nil {
		t.Fatal(err)
	}
	w.proxy = decodeChart(t, "ess proxy", rel)
	w.proxyEnv = chartEnv(t, w.proxy, w.proxy.deployments[0].Spec.Template.Spec.Containers[0])
	w.upstream = serviceOfURL(t, w.proxyEnv["UPSTREAM_URL"])
	return w
}

// serviceOfURL is the in-cluster Service a URL names (svc[.ns[.svc…]]:port).
func serviceOfURL(t *testing.T, raw string) hop {
	t.Helper()
	u, err := url.Parse(raw)
	if err != nil {
		t.Fatalf("%q: %v", raw, err)
	}
	host, port, err := net.SplitHostPort(u.Host)
	if err != nil {
		t.Fatalf("%q has no port: %v", raw, err)
	}
	parts := strings.Split(strings.TrimSuffix(host, "."), ".")
	if len(parts) > 1 && parts[1] != essNamespace {
		t.Fatalf("%q is not in namespace %s", raw, essNamespace)
	}
	return hop{parts[0], port}
}

// follow walks a request from start until it reaches a Synapse process,
// returning every hop: HAProxy routes it, the proxy forwards it to
// UPSTREAM_URL. A hop seen twice is a loop.
func (w *essWiring) follow(t *testing.T, method, path string, start hop) []hop {
	t.Helper()
	proxySvc := w.proxy.services[0]
	hops := []hop{start}
	for cur := start; ; {
		var next hop
		switch {
		case cur.service == proxySvc.Name:
			next = w.upstream
		case w.ess.workloadOf(w.ess.service(cur.service)) == "Deployment/"+essRelease+"-haproxy":
			next = w.haproxy.route(t, method, path)
		default:
			return hops // a Synapse process, MAS, …: the end of the line
		}
		if slices.Contains(hops, next) {
			t.Fatalf("%s %s loops: %v → %v", method, path, hops, next)
		}
		hops = append(hops, next)
		cur = next
		if w.ess.service(cur.service) == nil && cur.service != proxySvc.Name {
			t.Fatalf("%s %s goes to Service %s, which neither chart renders (hops %v)", method, path, cur.service, hops)
		}
	}
}

func (w *essWiring) viaProxy(hops []hop) bool {
	return slices.ContainsFunc(hops, func(h hop) bool { return h.service == w.proxy.services[0].Name })
}

// synapseHost is the ESS Ingress host clients use for the homeserver.
func synapseHost(t *testing.T) string {
	t.Helper()
	v := valuesFile(t, essChartDir(t)+"/ci/example-default-enabled-components-values.yaml")
	return v["synapse"].(map[string]any)["ingress"].(map[string]any)["host"].(string)
}

// TestESSWhoamiReachesProxy: a client's whoami goes Ingress → HAProxy →
// the proxy, and what the proxy asks goes to a Synapse process, not back.
func TestESSWhoamiReachesProxy(t *testing.T) {
	for _, v := range essVariants {
		t.Run(v.name, func(t *testing.T) { testESSWhoami(t, v) })
	}
}

func testESSWhoami(t *testing.T, v essVariant) {
	w := loadESSWiring(t, v)
	if len(w.haproxy.dupes) > 0 {
		t.Fatalf("haproxy.cfg declares backends %v more than once: HAProxy would not start", w.haproxy.dupes)
	}
	host := synapseHost(t)
	for _, p := range []string{"/_matrix/client/v3/account/whoami", "/_matrix/client/r0/account/whoami"} {
		hops := w.follow(t, "GET", p, w.ess.ingressRoute(t, host, p))
		t.Logf("GET %s: %v", p, hops)
		if !w.viaProxy(hops) {
			t.Errorf("GET %s does not reach the proxy: %v", p, hops)
		}
		checkProxyPort(t, w, hops)
		checkEndsAtSynapse(t, w, "GET "+p, hops)
	}
}

// TestESSMASCallsPassThroughProxy: MAS calls Synapse at matrix.endpoint;
// its /_synapse/mas/ calls reach the proxy, then Synapse.
func TestESSMASCallsPassThroughProxy(t *testing.T) {
	for _, v := range essVariants {
		t.Run(v.name, func(t *testing.T) { testESSMAS(t, v) })
	}
}

func testESSMAS(t *testing.T, v essVariant) {
	w := loadESSWiring(t, v)
	var mas struct {
		Matrix struct {
			Homeserver string `json:"homeserver"`
			Endpoint   string `json:"endpoint"`
			SecretFile string `json:"secret_file"`
		} `json:"matrix"`
	}
	cfg := w.ess.configMapData(t, essRelease+"-matrix-authentication-service", "mas-config-overrides.yaml")
	if err := yaml.Unmarshal([]byte(cfg), &mas); err != nil {
		t.Fatal(err)
	}
	start := serviceOfURL(t, mas.Matrix.Endpoint)
	if w.ess.service(start.service) == nil {
		t.Fatalf("MAS's matrix.endpoint %s is no Service of the render", mas.Matrix.Endpoint)
	}
	for _, p := range []string{"/_synapse/mas/delete_device", "/_synapse/mas/sync_devices", "/_synapse/mas/delete_user", "/_synapse/mas/provision_user"} {
		hops := w.follow(t, "POST", p, start)
		t.Logf("MAS POST %s: %v", p, hops)
		if !w.viaProxy(hops) {
			t.Errorf("MAS's POST %s does not pass through the proxy: %v", p, hops)
		}
		checkProxyPort(t, w, hops)
		checkEndsAtSynapse(t, w, "POST "+p, hops)
	}
	// The proxy asks MAS about locks with MAS's own secret, for ESS's server.
	if got, want := w.proxyEnv["SERVER_NAME"], mas.Matrix.Homeserver; got != want {
		t.Errorf("SERVER_NAME %q; MAS serves %q", got, want)
	}
	secret := w.proxyEnv["MAS_SECRET_FILE"]
	name, key := "", ""
	for _, v := range w.proxy.deployments[0].Spec.Template.Spec.Volumes {
		if v.Secret != nil && len(v.Secret.Items) == 1 {
			name, key = v.Secret.SecretName, v.Secret.Items[0].Key
		}
	}
	if want := "/secrets/" + name + "/" + key; mas.Matrix.SecretFile != want || !strings.HasSuffix(secret, "/"+key) {
		t.Errorf("the proxy reads MAS's secret from Secret %s key %s (%s); MAS reads %s", name, key, secret, mas.Matrix.SecretFile)
	}
	if intro := serviceOfURL(t, w.proxyEnv["MAS_INTROSPECTION_URL"]); w.ess.workloadOf(w.ess.service(intro.service)) != "Deployment/"+essRelease+"-matrix-authentication-service" {
		t.Errorf("MAS_INTROSPECTION_URL %s is not MAS's Service", w.proxyEnv["MAS_INTROSPECTION_URL"])
	}
}

// checkProxyPort: HAProxy reaches the proxy on a Service port that leads
// to its client port.
func checkProxyPort(t *testing.T, w *essWiring, hops []hop) {
	t.Helper()
	svc := w.proxy.services[0]
	for _, h := range hops {
		if h.service != svc.Name {
			continue
		}
		ok := false
		for _, p := range svc.Spec.Ports {
			ok = ok || ((p.Name == h.port || fmt.Sprint(p.Port) == h.port) && p.TargetPort.String() == "client")
		}
		if !ok {
			t.Errorf("%v: Service %s has no port %s to the client port", hops, svc.Name, h.port)
		}
	}
}

// checkEndsAtSynapse: the last hop is a Synapse process's HTTP port.
func checkEndsAtSynapse(t *testing.T, w *essWiring, what string, hops []hop) {
	t.Helper()
	last := hops[len(hops)-1]
	svc := w.ess.service(last.service)
	if svc == nil || !strings.HasPrefix(w.ess.workloadOf(svc), "StatefulSet/"+essRelease+"-synapse-") {
		t.Errorf("%s ends at %v, not a Synapse process (hops %v)", what, last, hops)
		return
	}
	for _, p := range svc.Spec.Ports {
		if p.Name == last.port || fmt.Sprint(p.Port) == last.port {
			if p.Name != "synapse-http" {
				t.Errorf("%s ends at %v, port %s, not Synapse's HTTP listener", what, last, p.Name)
			}
			return
		}
	}
	t.Errorf("%s ends at %v: Service %s has no such port", what, last, svc.Name)
}

// TestESSRoutesUnchanged: whatever the proxy forwards ends where ESS sent it
// without the proxy, and everything else takes exactly the road it took.
// With workers, the proxy's one upstream (Synapse main) cannot be both the
// client-reader that served whoami and main that serves /_synapse/mas/:
// those two end at main, which serves every path; the rest is unchanged.
func TestESSRoutesUnchanged(t *testing.T) {
	for _, v := range essVariants {
		t.Run(v.name, func(t *testing.T) { testESSRoutes(t, v) })
	}
}

func testESSRoutes(t *testing.T, v essVariant) {
	w := loadESSWiring(t, v)
	plain := renderESS(t, v, false)
	before := parseHAProxy(t, plain)
	host := synapseHost(t)
	for _, r := range []struct{ method, path string }{
		{"GET", "/_matrix/client/v3/account/whoami"},
		{"POST", "/_synapse/mas/delete_device"},
		{"GET", "/_matrix/client/v3/sync"},
		{"PUT", "/_matrix/client/v3/rooms/!r:ess.localhost/send/m.room.message/1"},
		{"POST", "/_matrix/client/v3/login"},
		{"POST", "/_matrix/client/v3/logout"},
		{"DELETE", "/_matrix/client/v3/devices/ABC"},
		{"GET", "/_matrix/client/v1/media/download/ess.localhost/abc"},
		{"POST", "/_synapse/admin/v1/deactivate/@a:ess.localhost"},
		{"GET", "/_matrix/federation/v1/version"},
	} {
		t.Run(r.method+" "+r.path, func(t *testing.T) {
			in := w.ess.ingressRoute(t, host, r.path)
			hops := w.follow(t, r.method, r.path, in)
			// Without the proxy: the plain render's Ingress and HAProxy.
			want := []hop{plain.ingressRoute(t, host, r.path)}
			if plain.workloadOf(plain.service(want[0].service)) == "Deployment/"+essRelease+"-haproxy" {
				want = append(want, before.route(t, r.method, r.path))
			}
			got, was := w.ess.normal(hops[len(hops)-1]), plain.normal(want[len(want)-1])
			main := hop{essRelease + "-synapse-main", "8008"}
			switch {
			case v.workers && w.viaProxy(hops):
				t.Logf("ends at %v (without the proxy: %v)", got, was)
				if got != main {
					t.Errorf("ends at %v (hops %v); want Synapse main %v, which serves every path", got, hops, main)
				}
			case got != was:
				t.Errorf("ends at %v (hops %v); without the proxy it ended at %v", got, hops, was)
			}
			if !w.viaProxy(hops) && !slices.Equal(hops, want) {
				t.Errorf("hops %v; without the proxy %v", hops, want)
			}
		})
	}
	if up := w.upstream.service; up == essRelease+"-synapse" || w.ess.workloadOf(w.ess.service(up)) == "Deployment/"+essRelease+"-haproxy" {
		t.Errorf("UPSTREAM_URL %s is HAProxy, which sends whoami and /_synapse/mas/ back to the proxy", w.proxyEnv["UPSTREAM_URL"])
	}
}

// TestESSScraped: the proxy's ServiceMonitor is one a Prometheus that
// scrapes ESS's ServiceMonitors picks up: same kind and namespace, the
// labels they all share, the same interval; and the NetworkPolicy lets
// HAProxy reach the client port.
func TestESSScraped(t *testing.T) {
	w := loadESSWiring(t, essVariants[0])
	if len(w.ess.monitors) == 0 {
		t.Fatal("ESS rendered no ServiceMonitors with the CRD present")
	}
	if len(w.proxy.svcMonitors) != 1 {
		t.Fatalf("the proxy rendered %d ServiceMonitors with the CRD present; want 1 (ESS uses ServiceMonitors)", len(w.proxy.svcMonitors))
	}
	sm := w.proxy.svcMonitors[0]
	shared := map[string]string{}
	for k, v := range w.ess.monitors[0].Labels {
		shared[k] = v
	}
	for _, m := range w.ess.monitors {
		for k, v := range shared {
			if m.Labels[k] != v {
				delete(shared, k)
			}
		}
		if m.Namespace != sm.Namespace {
			t.Errorf("ESS's ServiceMonitor %s is in %s; the proxy's in %s", m.Name, m.Namespace, sm.Namespace)
		}
	}
	for k, v := range shared {
		if k == "helm.sh/chart" || k == "app.kubernetes.io/version" {
			continue // the chart's own, not a selector's
		}
		if sm.Labels[k] != v {
			t.Errorf("ESS's ServiceMonitors all carry %s=%s; the proxy's has %q", k, v, sm.Labels[k])
		}
	}
	for _, ep := range sm.Spec.Endpoints {
		if ep.Interval != w.ess.monitors[0].Spec.Endpoints[0].Interval {
			t.Errorf("interval %s; ESS scrapes every %s", ep.Interval, w.ess.monitors[0].Spec.Endpoints[0].Interval)
		}
	}
	// With workers the replicas share invalidations over ESS's Redis.
	ww := loadESSWiring(t, essVariant{name: "workers", workers: true})
	if r := ww.proxy.deployments[0].Spec.Replicas; r == nil || *r < 2 {
		t.Errorf("with workers: %v replicas; want 2 sharing ESS's Redis", r)
	}
	redis := serviceOfURL(t, ww.proxyEnv["REDIS_URL"])
	if svc := ww.ess.service(redis.service); svc == nil || ww.ess.normal(hop{redis.service, "redis"}) != redis {
		t.Errorf("with workers: REDIS_URL %s is not ESS's Redis Service and port", ww.proxyEnv["REDIS_URL"])
	}
	if w.proxyEnv["TRUSTED_PROXIES"] == "" {
		t.Error("TRUSTED_PROXIES is empty: every request comes from HAProxy, whose X-Forwarded-For the proxy would ignore")
	}
}
