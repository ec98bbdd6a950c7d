package deploy

// The kustomizations under kubernetes/ render offline with the kustomize API,
// every object decodes strictly into its typed API struct, and what the
// manifests say agrees with the binary: variables it reads, its ports and
// probe paths, its shutdown timing.

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"
)

// The kustomizations an operator applies (components are rendered through
// them).
var kustomizations = []string{
	"kubernetes/example",
	"kubernetes/example-prometheus-operator",
	"kubernetes/existing-synapse",
}

const sidecarName = "matrix-auth-proxy"

// rendered is the output of one kustomization, decoded.
type rendered struct {
	dir          string
	raw          []map[string]any // each object as generic JSON
	deployments  []appsv1.Deployment
	statefulSets []appsv1.StatefulSet
	services     []corev1.Service
	configMaps   []corev1.ConfigMap
	policies     []networkingv1.NetworkPolicy
	podMonitors  []monitoringv1.PodMonitor
	rules        []monitoringv1.PrometheusRule
}

// render runs kustomize (as `kubectl apply -k` would, default options: no
// plugins, files only from within each kustomization) and decodes each
// object into its typed struct, failing on unknown fields and unknown kinds.
func render(t *testing.T, dir string) *rendered {
	t.Helper()
	resMap, err := krusty.MakeKustomizer(krusty.MakeDefaultOptions()).Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		t.Fatalf("kustomize build %s: %v", dir, err)
	}
	r := &rendered{dir: dir}
	for _, res := range resMap.Resources() {
		js, err := res.MarshalJSON()
		if err != nil {
			t.Fatalf("%s: %s: %v", dir, res.CurId(), err)
		}
		var generic map[string]any
		if err := json.Unmarshal(js, &generic); err != nil {
			t.Fatal(err)
		}
		r.raw = append(r.raw, generic)
		var into any
		switch gvk := res.GetApiVersion() + "/" + res.GetKind(); gvk {
		case "v1/Namespace":
			into = new(corev1.Namespace)
		case "v1/PersistentVolumeClaim":
			into = new(corev1.PersistentVolumeClaim)
		case "v1/ConfigMap":
			r.configMaps = append(r.configMaps, corev1.ConfigMap{})
			into = &r.configMaps[len(r.configMaps)-1]
		case "v1/Service":
			r.services = append(r.services, corev1.Service{})
			into = &r.services[len(r.services)-1]
		case "apps/v1/Deployment":
			r.deployments = append(r.deployments, appsv1.Deployment{})
			into = &r.deployments[len(r.deployments)-1]
		case "apps/v1/StatefulSet":
			r.statefulSets = append(r.statefulSets, appsv1.StatefulSet{})
			into = &r.statefulSets[len(r.statefulSets)-1]
		case "networking.k8s.io/v1/NetworkPolicy":
			r.policies = append(r.policies, networkingv1.NetworkPolicy{})
			into = &r.policies[len(r.policies)-1]
		case "monitoring.coreos.com/v1/PodMonitor":
			r.podMonitors = append(r.podMonitors, monitoringv1.PodMonitor{})
			into = &r.podMonitors[len(r.podMonitors)-1]
		case "monitoring.coreos.com/v1/PrometheusRule":
			r.rules = append(r.rules, monitoringv1.PrometheusRule{})
			into = &r.rules[len(r.rules)-1]
		case "v1/Secret":
			t.Errorf("%s: Secret %s: nothing secret belongs in plain manifests", dir, res.GetName())
			continue
		default:
			t.Errorf("%s: %s %s: no typed struct to check it against; add its kind to render", dir, gvk, res.GetName())
			continue
		}
		dec := json.NewDecoder(bytes.NewReader(js))
		dec.DisallowUnknownFields()
		if err := dec.Decode(into); err != nil {
			t.Errorf("%s: %s %s does not decode strictly: %v", dir, res.GetKind(), res.GetName(), err)
		}
	}
	return r
}

var renderCache = map[string]*rendered{}

func renderOnce(t *testing.T, dir string) *rendered {
	t.Helper()
	if r, ok := renderCache[dir]; ok {
		return r
	}
	r := render(t, dir)
	renderCache[dir] = r
	return r
}

func TestKustomizationsRender(t *testing.T) {
	for _, dir := range kustomizations {
		t.Run(dir, func(t *testing.T) {
			r := renderOnce(t, dir)
			if n := len(r.deployments) + len(r.statefulSets); n != 1 {
				t.Errorf("%d workloads; want the one Synapse", n)
			}
			if len(r.policies) != 1 {
				t.Errorf("%d NetworkPolicies; want 1", len(r.policies))
			}
		})
	}
}

// workload is the part of a Deployment or StatefulSet these tests look at.
type workload struct {
	name     string
	selector *metav1.LabelSelector
	pod      corev1.PodTemplateSpec
}

func (r *rendered) workloads() []workload {
	var ws []workload
	for _, d := range r.deployments {
		ws = append(ws, workload{"Deployment/" + d.Name, d.Spec.Selector, d.Spec.Template})
	}
	for _, s := range r.statefulSets {
		ws = append(ws, workload{"StatefulSet/" + s.Name, s.Spec.Selector, s.Spec.Template})
	}
	return ws
}

func (w workload) sidecar(t *testing.T) corev1.Container {
	t.Helper()
	for _, c := range w.pod.Spec.InitContainers {
		if c.Name == sidecarName {
			return c
		}
	}
	t.Fatalf("%s: no init container %q", w.name, sidecarName)
	return corev1.Container{}
}

func (r *rendered) configMap(t *testing.T, name string) corev1.ConfigMap {
	t.Helper()
	for _, cm := range r.configMaps {
		if cm.Name == name {
			return cm
		}
	}
	t.Fatalf("%s: no ConfigMap %q", r.dir, name)
	return corev1.ConfigMap{}
}

// proxyEnv is the environment the sidecar gets (containerEnv): the
// kustomizations put everything in ConfigMaps.
func proxyEnv(t *testing.T, r *rendered, c corev1.Container) map[string]string {
	t.Helper()
	return containerEnv(t, r.dir, c, func(name string) corev1.ConfigMap { return r.configMap(t, name) }, false)
}

// containerEnv is the environment the proxy container of where gets: the
// binary's defaults, then its ConfigMaps (envFrom, no prefix), then its env
// entries, each checked to be a variable the binary reads. With
// secretRefs, an env entry may come from a Secret (it stands as
// "<secret:name/key>"); without, valueFrom is an error.
func containerEnv(t *testing.T, where string, c corev1.Container, configMap func(string) corev1.ConfigMap, secretRefs bool) map[string]string {
	t.Helper()
	known := binaryEnv(t)
	env := map[string]string{}
	for name, v := range known {
		env[name] = v.Default
	}
	set := func(name, value, from string) {
		if _, ok := known[name]; !ok && !goRuntimeEnv[name] {
			t.Errorf("%s: %s sets %s, which the binary does not read (cmd/matrix-auth-proxy/config.go)", where, from, name)
		}
		env[name] = value
	}
	for _, src := range c.EnvFrom {
		if src.SecretRef != nil || src.ConfigMapRef == nil || src.Prefix != "" {
			t.Errorf("%s: envFrom %+v: configuration comes from ConfigMaps only, without a prefix", where, src)
			continue
		}
		cm := configMap(src.ConfigMapRef.Name)
		for k, v := range cm.Data {
			set(k, v, "ConfigMap "+cm.Name)
		}
	}
	for _, e := range c.Env {
		switch {
		case e.ValueFrom == nil:
			set(e.Name, e.Value, "env")
		case secretRefs && e.ValueFrom.SecretKeyRef != nil:
			ref := e.ValueFrom.SecretKeyRef
			set(e.Name, "<secret:"+ref.Name+"/"+ref.Key+">", "env")
		case secretRefs:
			t.Errorf("%s: env %s: only secretKeyRef is expected", where, e.Name)
		default:
			t.Errorf("%s: env %s uses valueFrom: put it in the ConfigMap", where, e.Name)
		}
	}
	return env
}

// goRuntimeEnv are variables the binary reads through the Go runtime rather
// than config.go.
var goRuntimeEnv = map[string]bool{"GOMEMLIMIT": true, "GOGC": true, "GOMAXPROCS": true}

func namedPort(c corev1.Container, name string) int32 {
	for _, p := range c.Ports {
		if p.Name == name {
			return p.ContainerPort
		}
	}
	return 0
}

// probePort resolves a probe's port (a name or a number) to a number.
func probePort(c corev1.Container, p intstr.IntOrString) int32 {
	if p.Type == intstr.String {
		return namedPort(c, p.StrVal)
	}
	return p.IntVal
}

func TestSidecar(t *testing.T) {
	for _, dir := range kustomizations {
		r := renderOnce(t, dir)
		for _, w := range r.workloads() {
			t.Run(dir+"/"+w.name, func(t *testing.T) {
				c := w.sidecar(t)
				env := proxyEnv(t, r, c)

				// A native sidecar: started before the homeserver, stopped after.
				if c.RestartPolicy == nil || *c.RestartPolicy != corev1.ContainerRestartPolicyAlways {
					t.Error("restartPolicy is not Always: not a native sidecar")
				}

				// Ports as the binary listens.
				client, admin := int32(portOf(t, env["LISTEN_ADDR"])), int32(portOf(t, env["ADMIN_ADDR"]))
				if got := namedPort(c, "client"); got != client {
					t.Errorf("port client = %d; LISTEN_ADDR %q", got, env["LISTEN_ADDR"])
				}
				if got := namedPort(c, "metrics"); got != admin {
					t.Errorf("port metrics = %d; ADMIN_ADDR %q", got, env["ADMIN_ADDR"])
				}

				// Probes on the admin port, on the binary's paths (which
				// TestProbePathsAnswer asks the real binary).
				for _, p := range []struct {
					name  string
					probe *corev1.Probe
					path  string
				}{
					{"startupProbe", c.StartupProbe, "/healthz"},
					{"livenessProbe", c.LivenessProbe, "/healthz"},
					{"readinessProbe", c.ReadinessProbe, "/readyz"},
				} {
					switch {
					case p.probe == nil || p.probe.HTTPGet == nil:
						t.Errorf("%s: want an httpGet probe of %s", p.name, p.path)
					case p.probe.HTTPGet.Path != p.path:
						t.Errorf("%s path %q; want %q", p.name, p.probe.HTTPGet.Path, p.path)
					case probePort(c, p.probe.HTTPGet.Port) != admin:
						t.Errorf("%s port %v; want the admin port %d", p.name, p.probe.HTTPGet.Port.String(), admin)
					}
				}

				// Resources: both requests and limits.
				for _, res := range []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory} {
					req, lim := c.Resources.Requests[res], c.Resources.Limits[res]
					if req.IsZero() || lim.IsZero() || req.Cmp(lim) > 0 {
						t.Errorf("%s: request %s, limit %s; want both, request ≤ limit", res, req.String(), lim.String())
					}
				}

				// Locked down.
				sc := c.SecurityContext
				if sc == nil {
					t.Fatal("no securityContext")
				}
				isTrue := func(b *bool) bool { return b != nil && *b }
				if !isTrue(sc.RunAsNonRoot) || !isTrue(sc.ReadOnlyRootFilesystem) ||
					sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
					t.Errorf("securityContext %+v: want runAsNonRoot, readOnlyRootFilesystem, no privilege escalation", sc)
				}
				if sc.RunAsUser == nil || *sc.RunAsUser != 65532 {
					t.Error("runAsUser: want 65532, the image's user")
				}
				if sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) || len(sc.Capabilities.Add) > 0 {
					t.Errorf("capabilities %+v: want drop ALL, add none", sc.Capabilities)
				}
				if sc.SeccompProfile == nil || sc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
					t.Errorf("seccompProfile %+v: want RuntimeDefault", sc.SeccompProfile)
				}

				// Time to drain before the kubelet kills the pod.
				delay, err1 := time.ParseDuration(env["SHUTDOWN_DELAY"])
				timeout, err2 := time.ParseDuration(env["SHUTDOWN_TIMEOUT"])
				if err1 != nil || err2 != nil {
					t.Fatalf("SHUTDOWN_DELAY %q, SHUTDOWN_TIMEOUT %q", env["SHUTDOWN_DELAY"], env["SHUTDOWN_TIMEOUT"])
				}
				grace := w.pod.Spec.TerminationGracePeriodSeconds
				if grace == nil || time.Duration(*grace)*time.Second <= delay+timeout {
					t.Errorf("terminationGracePeriodSeconds %v; want more than SHUTDOWN_DELAY + SHUTDOWN_TIMEOUT = %s", grace, delay+timeout)
				}

				// For Prometheus without the operator.
				a := w.pod.Annotations
				if a["prometheus.io/scrape"] != "true" || a["prometheus.io/port"] != fmt.Sprint(admin) || a["prometheus.io/path"] != "/metrics" {
					t.Errorf("pod annotations %v; want prometheus.io/scrape true, port %d, path /metrics", a, admin)
				}

				// The homeserver is what UPSTREAM_URL points at: in the pod.
				if !strings.HasPrefix(env["UPSTREAM_URL"], "http://127.0.0.1:") {
					t.Errorf("UPSTREAM_URL %q: want the homeserver on loopback in the same pod", env["UPSTREAM_URL"])
				}
				for _, hc := range w.pod.Spec.Containers {
					for _, p := range hc.Ports {
						if fmt.Sprint(p.ContainerPort) == env["UPSTREAM_URL"][strings.LastIndex(env["UPSTREAM_URL"], ":")+1:] {
							t.Errorf("container %s declares the homeserver port %d: it must listen on loopback only", hc.Name, p.ContainerPort)
						}
					}
				}

				// Services that select the pod send clients to the proxy.
				for _, svc := range r.services {
					if !labels.SelectorFromSet(svc.Spec.Selector).Matches(labels.Set(w.pod.Labels)) {
						continue
					}
					for _, sp := range svc.Spec.Ports {
						if probePort(c, sp.TargetPort) != client {
							t.Errorf("Service %s port %d targets %s; want the proxy's client port %d", svc.Name, sp.Port, sp.TargetPort.String(), client)
						}
					}
				}

				// The NetworkPolicy applies to this pod: admin port for the
				// monitoring namespace only, the client port for anyone,
				// nothing else (the homeserver port least of all).
				checkNetworkPolicy(t, r, w, c, client, admin)
			})
		}
	}
}

func checkNetworkPolicy(t *testing.T, r *rendered, w workload, c corev1.Container, client, admin int32) {
	t.Helper()
	for _, np := range r.policies {
		sel, err := metav1.LabelSelectorAsSelector(&np.Spec.PodSelector)
		if err != nil {
			t.Fatal(err)
		}
		if !sel.Matches(labels.Set(w.pod.Labels)) {
			t.Errorf("NetworkPolicy %s does not select the pod (labels %v)", np.Name, w.pod.Labels)
			continue
		}
		if !slices.Contains(np.Spec.PolicyTypes, networkingv1.PolicyTypeIngress) {
			t.Errorf("NetworkPolicy %s does not restrict Ingress", np.Name)
		}
		clientOpen := false
		for _, rule := range np.Spec.Ingress {
			if len(rule.Ports) == 0 {
				t.Errorf("NetworkPolicy %s: a rule allows every port", np.Name)
			}
			for _, p := range rule.Ports {
				if p.Port == nil || p.EndPort != nil {
					t.Errorf("NetworkPolicy %s: a rule allows a port range", np.Name)
					continue
				}
				switch probePort(c, *p.Port) {
				case client:
					clientOpen = clientOpen || len(rule.From) == 0
				case admin:
					if len(rule.From) == 0 {
						t.Errorf("NetworkPolicy %s: the admin port is open to all", np.Name)
					}
					for _, from := range rule.From {
						ns := from.NamespaceSelector
						if from.IPBlock != nil || ns == nil || len(ns.MatchExpressions) > 0 ||
							!maps(ns.MatchLabels, map[string]string{"kubernetes.io/metadata.name": "monitoring"}) {
							t.Errorf("NetworkPolicy %s: admin port reachable from %+v; want the monitoring namespace only", np.Name, from)
						}
					}
				default:
					t.Errorf("NetworkPolicy %s allows port %s, neither the proxy's client nor admin port", np.Name, p.Port.String())
				}
			}
		}
		if !clientOpen {
			t.Errorf("NetworkPolicy %s does not let clients reach port %d", np.Name, client)
		}
	}
}

func maps(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

// TestExampleHomeserverLoopbackOnly reads the example's homeserver.yaml out of
// its rendered ConfigMap: every Synapse listener binds to loopback, on the
// port UPSTREAM_URL names, and trusts X-Forwarded-For (the proxy sets it).
func TestExampleHomeserverLoopbackOnly(t *testing.T) {
	r := renderOnce(t, "kubernetes/example")
	w := r.workloads()[0]
	env := proxyEnv(t, r, w.sidecar(t))
	var hs struct {
		Listeners []struct {
			Port          int      `json:"port"`
			BindAddresses []string `json:"bind_addresses"`
			Type          string   `json:"type"`
			XForwarded    bool     `json:"x_forwarded"`
		} `json:"listeners"`
	}
	var found bool
	for _, v := range w.pod.Spec.Volumes {
		if v.ConfigMap == nil || !strings.HasPrefix(v.ConfigMap.Name, "synapse-config") {
			continue
		}
		found = true
		cm := r.configMap(t, v.ConfigMap.Name)
		if err := yaml.Unmarshal([]byte(cm.Data["homeserver.yaml"]), &hs); err != nil {
			t.Fatal(err)
		}
	}
	if !found || len(hs.Listeners) == 0 {
		t.Fatal("no homeserver.yaml with listeners mounted from ConfigMap synapse-config")
	}
	for _, l := range hs.Listeners {
		if len(l.BindAddresses) == 0 {
			t.Errorf("listener on %d binds to every address (no bind_addresses)", l.Port)
		}
		for _, a := range l.BindAddresses {
			if a != "127.0.0.1" && a != "::1" {
				t.Errorf("listener on %d binds to %q: clients could bypass the proxy", l.Port, a)
			}
		}
		if want := fmt.Sprintf("http://127.0.0.1:%d", l.Port); l.Type == "http" && env["UPSTREAM_URL"] != want {
			t.Errorf("UPSTREAM_URL %q; the listener is %s", env["UPSTREAM_URL"], want)
		}
		if !l.XForwarded {
			t.Errorf("listener on %d: x_forwarded false, Synapse would log the proxy as every client", l.Port)
		}
	}
	// The sidecar comes first, so the homeserver starts after it.
	if w.pod.Spec.InitContainers[0].Name != sidecarName {
		t.Errorf("first init container is %q; want the sidecar", w.pod.Spec.InitContainers[0].Name)
	}
}

// TestProbePathsAnswer asks the real binary the sidecar's probe paths, on
// the port the manifests probe.
func TestProbePathsAnswer(t *testing.T) {
	r := renderOnce(t, "kubernetes/example")
	c := r.workloads()[0].sidecar(t)
	hs := fakeHomeserver(t)
	p := startProxy(t, hs.URL, nil)
	for _, probe := range []*corev1.Probe{c.StartupProbe, c.LivenessProbe, c.ReadinessProbe} {
		deadline := time.Now().Add(10 * time.Second)
		for {
			code, body := get(t, p.AdminURL+probe.HTTPGet.Path, "")
			if code == http.StatusOK {
				break
			}
			if time.Now().After(deadline) {
				t.Errorf("GET %s: %d %s; want 200 with the homeserver up", probe.HTTPGet.Path, code, body)
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
}
