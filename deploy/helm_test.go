package deploy

// The Helm chart in helm/matrix-auth-proxy, rendered offline with the Helm
// Go SDK as `helm install --dry-run=client` would (schema validation,
// hooks, NOTES; lookup finds nothing), each object decoded strictly into its
// typed API struct, and checked against the binary as the kustomize
// manifests are: the variables it reads, its ports and probe paths, its
// shutdown timing; the monitoring objects against deploy/monitoring/.

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"text/template"
	"time"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	"helm.sh/helm/v4/pkg/action"
	chartcommon "helm.sh/helm/v4/pkg/chart/common"
	chartutil "helm.sh/helm/v4/pkg/chart/common/util"
	chartv2 "helm.sh/helm/v4/pkg/chart/v2"
	"helm.sh/helm/v4/pkg/chart/v2/loader"
	"helm.sh/helm/v4/pkg/engine"
	releasev1 "helm.sh/helm/v4/pkg/release/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"
)

const chartDir = "helm/matrix-auth-proxy"

// testKubeVersion is the cluster the charts are rendered for.
const testKubeVersion = "v1.33.0"

// The CRDs a cluster with prometheus-operator has; "auto" monitoring
// objects are rendered only when these are given.
var prometheusOperatorAPIs = []string{
	"monitoring.coreos.com/v1/ServiceMonitor",
	"monitoring.coreos.com/v1/PodMonitor",
	"monitoring.coreos.com/v1/PrometheusRule",
}

// helmInstall renders chart as `helm install --dry-run=client` does.
func helmInstall(t *testing.T, chrt *chartv2.Chart, release, namespace string, vals map[string]any, apis []string) (*releasev1.Release, error) {
	t.Helper()
	install := action.NewInstall(action.NewConfiguration())
	install.DryRunStrategy = action.DryRunClient
	install.ReleaseName = release
	install.Namespace = namespace
	install.APIVersions = apis
	// A supported cluster: the proxy's chart and ESS both need more than
	// the SDK's default (v1.20).
	kv, err := chartcommon.ParseKubeVersion(testKubeVersion)
	if err != nil {
		t.Fatal(err)
	}
	install.KubeVersion = kv
	rel, err := install.Run(chrt, vals)
	if err != nil {
		return nil, err
	}
	r, ok := rel.(*releasev1.Release)
	if !ok {
		t.Fatalf("install returned %T", rel)
	}
	return r, nil
}

var quietHelm sync.Once

func loadChart(t *testing.T, dir string) *chartv2.Chart {
	t.Helper()
	// The SDK logs through slog's default (a line per symbolic link in
	// files/); the tests say what matters themselves.
	quietHelm.Do(func() { slog.SetDefault(slog.New(slog.DiscardHandler)) })
	c, err := loader.Load(dir)
	if err != nil {
		t.Fatalf("load chart %s: %v", dir, err)
	}
	return c
}

// valuesFile reads a values file into the map Helm takes.
func valuesFile(t *testing.T, path string) map[string]any {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	v := map[string]any{}
	if err := yaml.Unmarshal(b, &v); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return v
}

// mergeValues layers values as repeated -f flags do: later files win, maps
// merge key by key.
func mergeValues(layers ...map[string]any) map[string]any {
	out := map[string]any{}
	for _, l := range layers {
		for k, v := range l {
			if vm, ok := v.(map[string]any); ok {
				if om, ok := out[k].(map[string]any); ok {
					out[k] = mergeValues(om, vm)
					continue
				}
			}
			out[k] = v
		}
	}
	return out
}

// manifestObjects splits a rendered manifest into its objects as JSON.
func manifestObjects(t *testing.T, manifest string) [][]byte {
	t.Helper()
	var objs [][]byte
	r := utilyaml.NewYAMLReader(bufio.NewReader(strings.NewReader(manifest)))
	for {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			return objs
		}
		if err != nil {
			t.Fatal(err)
		}
		js, err := yaml.YAMLToJSON(doc)
		if err != nil {
			t.Fatalf("not YAML: %v\n%s", err, doc)
		}
		if s := string(bytes.TrimSpace(js)); s == "null" || s == "{}" {
			continue
		}
		objs = append(objs, js)
	}
}

// chartObjects is one release of the chart, decoded.
type chartObjects struct {
	name         string
	rel          *releasev1.Release
	deployments  []appsv1.Deployment
	services     []corev1.Service
	configMaps   []corev1.ConfigMap
	secrets      []corev1.Secret
	accounts     []corev1.ServiceAccount
	pdbs         []policyv1.PodDisruptionBudget
	policies     []networkingv1.NetworkPolicy
	svcMonitors  []monitoringv1.ServiceMonitor
	podMonitors  []monitoringv1.PodMonitor
	rules        []monitoringv1.PrometheusRule
	testPods     []corev1.Pod
	allLabels    []map[string]string // every object's, to check the standard ones
	allNamespace []string
}

// decodeStrict decodes js into a new element of *list, failing on unknown
// fields.
func decodeStrict[T any](t *testing.T, js []byte, list *[]T, what string) *T {
	t.Helper()
	*list = append(*list, *new(T))
	into := &(*list)[len(*list)-1]
	dec := json.NewDecoder(bytes.NewReader(js))
	dec.DisallowUnknownFields()
	if err := dec.Decode(into); err != nil {
		t.Errorf("%s does not decode strictly: %v", what, err)
	}
	return into
}

func decodeChart(t *testing.T, name string, rel *releasev1.Release) *chartObjects {
	t.Helper()
	o := &chartObjects{name: name, rel: rel}
	docs := manifestObjects(t, rel.Manifest)
	for _, h := range rel.Hooks {
		docs = append(docs, manifestObjects(t, h.Manifest)...)
	}
	for _, js := range docs {
		var meta struct {
			APIVersion string            `json:"apiVersion"`
			Kind       string            `json:"kind"`
			Metadata   metav1.ObjectMeta `json:"metadata"`
		}
		if err := json.Unmarshal(js, &meta); err != nil {
			t.Fatal(err)
		}
		what := fmt.Sprintf("%s: %s %s", name, meta.Kind, meta.Metadata.Name)
		o.allLabels = append(o.allLabels, meta.Metadata.Labels)
		o.allNamespace = append(o.allNamespace, meta.Metadata.Namespace)
		switch meta.APIVersion + "/" + meta.Kind {
		case "apps/v1/Deployment":
			decodeStrict(t, js, &o.deployments, what)
		case "v1/Service":
			decodeStrict(t, js, &o.services, what)
		case "v1/ConfigMap":
			decodeStrict(t, js, &o.configMaps, what)
		case "v1/Secret":
			decodeStrict(t, js, &o.secrets, what)
		case "v1/ServiceAccount":
			decodeStrict(t, js, &o.accounts, what)
		case "v1/Pod":
			decodeStrict(t, js, &o.testPods, what)
		case "policy/v1/PodDisruptionBudget":
			decodeStrict(t, js, &o.pdbs, what)
		case "networking.k8s.io/v1/NetworkPolicy":
			decodeStrict(t, js, &o.policies, what)
		case "monitoring.coreos.com/v1/ServiceMonitor":
			decodeStrict(t, js, &o.svcMonitors, what)
		case "monitoring.coreos.com/v1/PodMonitor":
			decodeStrict(t, js, &o.podMonitors, what)
		case "monitoring.coreos.com/v1/PrometheusRule":
			decodeStrict(t, js, &o.rules, what)
		default:
			t.Errorf("%s: no typed struct to check it against; add its kind to decodeChart", what)
		}
	}
	return o
}

// chartCase is one documented way to install the chart.
type chartCase struct {
	name string
	vals map[string]any
	apis []string
}

// chartCases: a default install (only what is required), a full one, and
// every documented example values file (helm/matrix-auth-proxy/examples/
// and the ESS one).
func chartCases(t *testing.T) []chartCase {
	t.Helper()
	cases := []chartCase{
		{name: "default", vals: map[string]any{
			"upstream": map[string]any{"url": "http://synapse:8008"},
			"redis":    map[string]any{"url": "redis://redis:6379"},
		}},
		{name: "full", apis: prometheusOperatorAPIs, vals: map[string]any{
			"replicaCount": 3,
			"upstream":     map[string]any{"url": "http://{{ .Release.Name }}-synapse:8008"},
			"config":       map[string]any{"logLevel": "debug", "cacheTTL": "5m", "shutdownDelay": "10s"},
			"rateLimit": map[string]any{"rps": 5.5, "exemptUsers": []any{"@bridge:example.org"},
				"exemptCIDRs": []any{"10.1.0.0/16"}},
			"trustedProxies": []any{"10.0.0.0/8", "fd00::/8"},
			"networkPolicy": map[string]any{"clientFrom": []any{map[string]any{"namespaceSelector": map[string]any{
				"matchLabels": map[string]any{"kubernetes.io/metadata.name": "ingress-nginx"}}}}},
			"tokenHashKey": map[string]any{"existingSecret": "proxy-secrets", "existingSecretKey": "hash-key"},
			"redis": map[string]any{"url": "rediss://redis.example:6380/2",
				"password": map[string]any{"existingSecret": "redis-auth", "existingSecretKey": "password"}},
			"mas": map[string]any{"serverName": "example.org", "introspectionURL": "http://mas:8080/oauth2/introspect",
				"secret": map[string]any{"existingSecret": "mas-secrets", "existingSecretKey": "matrix-secret"}},
			"resources":  map[string]any{"limits": map[string]any{"cpu": "2", "memory": "1Gi"}, "requests": map[string]any{"cpu": "200m", "memory": "512Mi"}},
			"monitoring": map[string]any{"monitor": map[string]any{"enabled": true, "kind": "PodMonitor"}, "dashboard": map[string]any{"enabled": true}},
		}},
	}
	examples, err := filepath.Glob(filepath.Join(chartDir, "examples", "*.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	essVals := filepath.Join("helm", "ess", "matrix-auth-proxy-values.yaml")
	examples = append(examples, essVals)
	for _, f := range examples {
		cases = append(cases, chartCase{name: f, vals: valuesFile(t, f), apis: prometheusOperatorAPIs})
	}
	workers := filepath.Join("helm", "ess", "matrix-auth-proxy-workers-values.yaml")
	return append(cases, chartCase{name: essVals + "+" + workers, apis: prometheusOperatorAPIs,
		vals: mergeValues(valuesFile(t, essVals), valuesFile(t, workers))})
}

var chartRenders = map[string]*chartObjects{}

func renderChartCase(t *testing.T, chrt *chartv2.Chart, c chartCase) *chartObjects {
	t.Helper()
	if o, ok := chartRenders[c.name]; ok {
		return o
	}
	rel, err := helmInstall(t, chrt, "ess", "matrix", c.vals, c.apis)
	if err != nil {
		t.Fatalf("%s: helm install --dry-run: %v", c.name, err)
	}
	o := decodeChart(t, c.name, rel)
	chartRenders[c.name] = o
	return o
}

func (o *chartObjects) configMap(t *testing.T, name string) corev1.ConfigMap {
	t.Helper()
	for _, cm := range o.configMaps {
		if cm.Name == name {
			return cm
		}
	}
	t.Fatalf("%s: no ConfigMap %q", o.name, name)
	return corev1.ConfigMap{}
}

func (o *chartObjects) secret(name string) *corev1.Secret {
	for i := range o.secrets {
		if o.secrets[i].Name == name {
			return &o.secrets[i]
		}
	}
	return nil
}

// chartEnv is the proxy container's environment (containerEnv); the chart
// may take secrets from a Secret (they stand as "<secret:name/key>").
func chartEnv(t *testing.T, o *chartObjects, c corev1.Container) map[string]string {
	t.Helper()
	return containerEnv(t, o.name, c, func(name string) corev1.ConfigMap { return o.configMap(t, name) }, true)
}

// TestHelmChartSetsEverything: every variable the binary reads is set by
// some documented install (so reachable from values.yaml), except
// MAS_SECRET: the chart mounts MAS's secret as a file (MAS_SECRET_FILE).
func TestHelmChartSetsEverything(t *testing.T) {
	chrt := loadChart(t, chartDir)
	set := map[string]bool{}
	for _, c := range chartCases(t) {
		o := renderChartCase(t, chrt, c)
		ctr := o.deployments[0].Spec.Template.Spec.Containers[0]
		for _, src := range ctr.EnvFrom {
			for k := range o.configMap(t, src.ConfigMapRef.Name).Data {
				set[k] = true
			}
		}
		for _, e := range ctr.Env {
			set[e.Name] = true
		}
	}
	documented := readFileAbs(t, filepath.Join(chartDir, "values.yaml"))
	for name := range binaryEnv(t) {
		if !set[name] && name != "MAS_SECRET" {
			t.Errorf("no documented install sets %s: every setting of the binary must be reachable from values.yaml", name)
		}
		if !strings.Contains(documented, name) && name != "MAS_SECRET" {
			t.Errorf("values.yaml does not document which value sets %s", name)
		}
	}
}

func TestHelmChartRenders(t *testing.T) {
	chrt := loadChart(t, chartDir)
	for _, c := range chartCases(t) {
		t.Run(c.name, func(t *testing.T) {
			o := renderChartCase(t, chrt, c)
			checkChart(t, o, c)
		})
	}
}

func checkChart(t *testing.T, o *chartObjects, c chartCase) {
	t.Helper()
	if len(o.deployments) != 1 || len(o.services) != 1 {
		t.Fatalf("%d Deployments, %d Services; want 1 each", len(o.deployments), len(o.services))
	}
	d, svc := o.deployments[0], o.services[0]
	pod := d.Spec.Template
	for i, l := range o.allLabels {
		for _, k := range []string{"app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
			"app.kubernetes.io/managed-by", "app.kubernetes.io/component", "helm.sh/chart"} {
			if l[k] == "" {
				t.Errorf("object %d: no label %s (labels %v)", i, k, l)
			}
		}
		if o.allNamespace[i] == "" {
			t.Errorf("object %d (labels %v): no namespace", i, l)
		}
	}
	if len(pod.Spec.Containers) != 1 {
		t.Fatalf("%d containers; want the proxy alone", len(pod.Spec.Containers))
	}
	ctr := pod.Spec.Containers[0]
	env := chartEnv(t, o, ctr)
	// Secrets: each reference resolves to the chart's Secret (with that key)
	// or to a Secret the values name.
	for _, e := range ctr.Env {
		ref := e.ValueFrom.SecretKeyRef
		if s := o.secret(ref.Name); s != nil {
			if len(s.Data[ref.Key]) < minTokenHashKey {
				t.Errorf("%s from Secret %s key %s: %d bytes generated; want at least %d", e.Name, ref.Name, ref.Key, len(s.Data[ref.Key]), minTokenHashKey)
			}
			if s.Annotations["helm.sh/resource-policy"] != "keep" {
				t.Errorf("Secret %s is not kept on uninstall: a reinstall would name tokens differently", s.Name)
			}
		} else if !strings.Contains(fmt.Sprint(c.vals), ref.Name) {
			t.Errorf("%s from Secret %s, which neither the chart renders nor the values name", e.Name, ref.Name)
		}
	}
	if !strings.HasPrefix(env["TOKEN_HASH_KEY"], "<secret:") {
		t.Errorf("TOKEN_HASH_KEY = %q; want it from a Secret", env["TOKEN_HASH_KEY"])
	}
	if f := env["MAS_SECRET_FILE"]; f != "" {
		mounted := false
		for _, m := range ctr.VolumeMounts {
			mounted = mounted || (strings.HasPrefix(f, m.MountPath+"/") && m.ReadOnly)
		}
		if !mounted {
			t.Errorf("MAS_SECRET_FILE %q is not in a read-only mount", f)
		}
	}
	if r := d.Spec.Replicas; r == nil || (*r > 1 && env["REDIS_URL"] == "") {
		t.Errorf("replicas %v with REDIS_URL %q: replicas would not share invalidations", r, env["REDIS_URL"])
	}

	// Ports, probes, Service.
	client, admin := int32(portOf(t, env["LISTEN_ADDR"])), int32(portOf(t, env["ADMIN_ADDR"]))
	if namedPort(ctr, "client") != client || namedPort(ctr, "metrics") != admin {
		t.Errorf("ports %+v; LISTEN_ADDR %s, ADMIN_ADDR %s", ctr.Ports, env["LISTEN_ADDR"], env["ADMIN_ADDR"])
	}
	auth := int32(0) // AUTH_ADDR, the forward-auth listener: off unless set
	if env["AUTH_ADDR"] != "" {
		auth = int32(portOf(t, env["AUTH_ADDR"]))
	}
	if namedPort(ctr, "auth") != auth {
		t.Errorf("container port auth %d; AUTH_ADDR %q", namedPort(ctr, "auth"), env["AUTH_ADDR"])
	}
	for _, p := range []struct {
		name  string
		probe *corev1.Probe
		path  string
	}{
		{"startupProbe", ctr.StartupProbe, "/healthz"},
		{"livenessProbe", ctr.LivenessProbe, "/healthz"},
		{"readinessProbe", ctr.ReadinessProbe, "/readyz"},
	} {
		switch {
		case p.probe == nil || p.probe.HTTPGet == nil:
			t.Errorf("%s: want an httpGet probe of %s", p.name, p.path)
		case p.probe.HTTPGet.Path != p.path || probePort(ctr, p.probe.HTTPGet.Port) != admin:
			t.Errorf("%s: %s on %s; want %s on the admin port %d", p.name, p.probe.HTTPGet.Path, p.probe.HTTPGet.Port.String(), p.path, admin)
		}
	}
	if !labels.SelectorFromSet(svc.Spec.Selector).Matches(labels.Set(pod.Labels)) {
		t.Errorf("Service selector %v does not select the pods (%v)", svc.Spec.Selector, pod.Labels)
	}
	for _, sp := range svc.Spec.Ports {
		switch target := probePort(ctr, sp.TargetPort); {
		case sp.Name == "metrics" && sp.Port == admin && target == admin:
		case sp.Name == "client" && sp.Port == client && target == client:
		case strings.HasPrefix(sp.Name, "client-") && target == client: // service.extraClientPorts
		case sp.Name == "auth" && auth != 0 && sp.Port == auth && target == auth:
		default:
			t.Errorf("Service port %s %d → %s; want client %d or metrics %d on the same container port", sp.Name, sp.Port, sp.TargetPort.String(), client, admin)
		}
	}
	for _, tp := range o.testPods {
		if labels.SelectorFromSet(svc.Spec.Selector).Matches(labels.Set(tp.Labels)) {
			t.Errorf("the Service selects test pod %s", tp.Name)
		}
	}

	// Resources and GOMEMLIMIT below the memory limit.
	for _, res := range []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory} {
		req, lim := ctr.Resources.Requests[res], ctr.Resources.Limits[res]
		if req.IsZero() || lim.IsZero() || req.Cmp(lim) > 0 {
			t.Errorf("%s: request %s, limit %s; want both, request ≤ limit", res, req.String(), lim.String())
		}
	}
	lim := ctr.Resources.Limits[corev1.ResourceMemory]
	gml, err := resource.ParseQuantity(strings.TrimSuffix(env["GOMEMLIMIT"], "B"))
	if err != nil {
		t.Errorf("GOMEMLIMIT %q: %v", env["GOMEMLIMIT"], err)
	} else if g, l := gml.Value(), lim.Value(); g >= l || g < l*7/10 {
		t.Errorf("GOMEMLIMIT %s for a %s limit; want 70%%–100%% of it", env["GOMEMLIMIT"], lim.String())
	}

	// Locked down, as the sidecar.
	sc := ctr.SecurityContext
	isTrue := func(b *bool) bool { return b != nil && *b }
	if sc == nil || !isTrue(sc.RunAsNonRoot) || !isTrue(sc.ReadOnlyRootFilesystem) || sc.AllowPrivilegeEscalation == nil ||
		*sc.AllowPrivilegeEscalation || sc.RunAsUser == nil || *sc.RunAsUser != 65532 || sc.Capabilities == nil ||
		!slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) || sc.SeccompProfile == nil ||
		sc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Errorf("securityContext %+v: want non-root 65532, read-only root, no escalation, drop ALL, RuntimeDefault", sc)
	}

	// Shutdown timing.
	delay, err1 := time.ParseDuration(env["SHUTDOWN_DELAY"])
	timeout, err2 := time.ParseDuration(env["SHUTDOWN_TIMEOUT"])
	grace := pod.Spec.TerminationGracePeriodSeconds
	if err1 != nil || err2 != nil || grace == nil || time.Duration(*grace)*time.Second <= delay+timeout {
		t.Errorf("terminationGracePeriodSeconds %v; want more than SHUTDOWN_DELAY %q + SHUTDOWN_TIMEOUT %q", grace, env["SHUTDOWN_DELAY"], env["SHUTDOWN_TIMEOUT"])
	}

	// Scaling on its own: spread, and a PDB with more than one replica.
	if len(pod.Spec.TopologySpreadConstraints) == 0 {
		t.Error("no topologySpreadConstraints")
	}
	for _, tsc := range pod.Spec.TopologySpreadConstraints {
		sel, err := metav1.LabelSelectorAsSelector(tsc.LabelSelector)
		if err != nil || !sel.Matches(labels.Set(pod.Labels)) {
			t.Errorf("topology spread %+v does not select the pods", tsc)
		}
	}
	if *d.Spec.Replicas > 1 && len(o.pdbs) != 1 {
		t.Errorf("%d replicas, %d PodDisruptionBudgets; want 1", *d.Spec.Replicas, len(o.pdbs))
	}

	// The admin port only for monitoring (and the test pod).
	if len(o.policies) != 1 {
		t.Errorf("%d NetworkPolicies; want 1", len(o.policies))
	}
	for _, np := range o.policies {
		sel, _ := metav1.LabelSelectorAsSelector(&np.Spec.PodSelector)
		if !sel.Matches(labels.Set(pod.Labels)) {
			t.Errorf("NetworkPolicy %s does not select the pods", np.Name)
		}
		for _, rule := range np.Spec.Ingress {
			for _, p := range rule.Ports {
				if probePort(ctr, *p.Port) == admin && len(rule.From) == 0 {
					t.Errorf("NetworkPolicy %s: the admin port is open to all", np.Name)
				}
			}
		}
	}

	// helm test asks /readyz on the admin port through the Service.
	if len(o.testPods) != 1 {
		t.Fatalf("%d test pods; want 1", len(o.testPods))
	}
	tp := o.testPods[0]
	want := fmt.Sprintf("http://%s:%d/readyz", svc.Name, admin)
	if !slices.Contains(tp.Spec.Containers[0].Command, want) {
		t.Errorf("test pod runs %v; want it to ask %s", tp.Spec.Containers[0].Command, want)
	}
	if np := o.policies; len(np) == 1 && !admits(np[0], tp.Labels, admin, ctr) {
		t.Errorf("the NetworkPolicy keeps the test pod (labels %v) from the admin port", tp.Labels)
	}
	if !strings.Contains(o.rel.Info.Notes, "helm -n") || !strings.Contains(o.rel.Info.Notes, "/whoami") {
		t.Errorf("NOTES.txt does not say how to check it works:\n%s", o.rel.Info.Notes)
	}
}

// admits reports whether policy np lets a pod with labels l in the same
// namespace reach port.
func admits(np networkingv1.NetworkPolicy, l map[string]string, port int32, c corev1.Container) bool {
	for _, rule := range np.Spec.Ingress {
		hasPort := false
		for _, p := range rule.Ports {
			hasPort = hasPort || probePort(c, *p.Port) == port
		}
		if !hasPort {
			continue
		}
		if len(rule.From) == 0 {
			return true
		}
		for _, from := range rule.From {
			if from.PodSelector == nil || from.NamespaceSelector != nil {
				continue
			}
			if sel, err := metav1.LabelSelectorAsSelector(from.PodSelector); err == nil && sel.Matches(labels.Set(l)) {
				return true
			}
		}
	}
	return false
}

// minTokenHashKey mirrors the binary's minimum TOKEN_HASH_KEY length.
const minTokenHashKey = 32

// TestHelmChartMonitoring: the monitoring objects come from deploy/monitoring
// (the one source, which the kustomize components use too), are created
// when asked or when the CRD exists, and set the job the alerts select on.
func TestHelmChartMonitoring(t *testing.T) {
	for _, f := range []struct{ link, target string }{
		{"files/alerts.rules.yml", "../../../monitoring/alerts.rules.yml"},
		{"files/dashboard.json", "../../../monitoring/grafana/dashboard.json"},
	} {
		if got, err := os.Readlink(filepath.Join(chartDir, f.link)); err != nil || got != f.target {
			t.Errorf("%s/%s: want a symbolic link to %s (one source), got %q, %v", chartDir, f.link, f.target, got, err)
		}
	}
	chrt := loadChart(t, chartDir)
	base := map[string]any{"replicaCount": 1, "upstream": map[string]any{"url": "http://synapse:8008"}}
	for _, c := range []struct {
		name               string
		vals               map[string]any
		apis               []string
		monitors, rules, d int
	}{
		{"no CRDs, auto", base, nil, 0, 0, 0},
		{"CRDs, auto", base, prometheusOperatorAPIs, 1, 1, 0},
		{"CRDs, off", mergeValues(base, map[string]any{"monitoring": map[string]any{
			"monitor": map[string]any{"enabled": false}, "prometheusRule": map[string]any{"enabled": false}}}), prometheusOperatorAPIs, 0, 0, 0},
		{"no CRDs, asked, dashboard", mergeValues(base, map[string]any{"monitoring": map[string]any{
			"monitor": map[string]any{"enabled": true}, "prometheusRule": map[string]any{"enabled": true},
			"dashboard": map[string]any{"enabled": true}}}), nil, 1, 1, 1},
	} {
		t.Run(c.name, func(t *testing.T) {
			rel, err := helmInstall(t, chrt, "mon", "matrix", c.vals, c.apis)
			if err != nil {
				t.Fatal(err)
			}
			o := decodeChart(t, c.name, rel)
			dashboards := 0
			for _, cm := range o.configMaps {
				if cm.Labels["grafana_dashboard"] == "1" {
					dashboards++
					if cm.Data["matrix-auth-proxy.json"] != readFile(t, "deploy", "monitoring", "grafana", "dashboard.json") {
						t.Errorf("ConfigMap %s is not monitoring/grafana/dashboard.json", cm.Name)
					}
				}
			}
			if n := len(o.svcMonitors) + len(o.podMonitors); n != c.monitors || len(o.rules) != c.rules || dashboards != c.d {
				t.Fatalf("%d monitors, %d PrometheusRules, %d dashboards; want %d, %d, %d", n, len(o.rules), dashboards, c.monitors, c.rules, c.d)
			}
			for _, sm := range o.svcMonitors {
				svc := o.services[0]
				if !labels.SelectorFromSet(sm.Spec.Selector.MatchLabels).Matches(labels.Set(svc.Labels)) {
					t.Errorf("ServiceMonitor selects %v; the Service has %v", sm.Spec.Selector.MatchLabels, svc.Labels)
				}
				for _, ep := range sm.Spec.Endpoints {
					if ep.Port != "metrics" || ep.Path != "/metrics" || !setsJob(ep.RelabelConfigs) {
						t.Errorf("ServiceMonitor endpoint %+v: want port metrics, /metrics, job=matrix-auth-proxy", ep)
					}
				}
			}
			for _, r := range o.rules {
				var want struct {
					Groups []monitoringv1.RuleGroup `json:"groups"`
				}
				if err := yaml.UnmarshalStrict([]byte(readFile(t, "deploy", "monitoring", "alerts.rules.yml")), &want); err != nil {
					t.Fatal(err)
				}
				got, _ := json.Marshal(r.Spec.Groups)
				w, _ := json.Marshal(want.Groups)
				if !bytes.Equal(got, w) {
					t.Errorf("PrometheusRule %s differs from monitoring/alerts.rules.yml", r.Name)
				}
			}
		})
	}
}

func setsJob(rcs []monitoringv1.RelabelConfig) bool {
	for _, rc := range rcs {
		if rc.TargetLabel == "job" && rc.Replacement != nil && *rc.Replacement == "matrix-auth-proxy" {
			return true
		}
	}
	return false
}

// TestHelmChartLint runs `helm lint --strict` on the chart with the values of
// each documented install.
func TestHelmChartLint(t *testing.T) {
	for _, c := range chartCases(t) {
		t.Run(c.name, func(t *testing.T) {
			lint := action.NewLint()
			lint.Strict = true
			lint.Namespace = "matrix"
			kv, err := chartcommon.ParseKubeVersion(testKubeVersion)
			if err != nil {
				t.Fatal(err)
			}
			lint.KubeVersion = kv
			res := lint.Run([]string{chartDir}, c.vals)
			for _, m := range res.Messages {
				t.Log(m.Error())
			}
			if action.HasWarningsOrErrors(res) || len(res.Errors) > 0 {
				t.Errorf("helm lint --strict: %v", res.Errors)
			}
		})
	}
}

// TestHelmChartRejects: wrong values fail the install with a message that
// names the value, as an operator sees it from helm install.
func TestHelmChartRejects(t *testing.T) {
	chrt := loadChart(t, chartDir)
	ok := map[string]any{"replicaCount": 1, "upstream": map[string]any{"url": "http://synapse:8008"}}
	for _, c := range []struct {
		name string
		vals map[string]any
		want []string
	}{
		{"no upstream", map[string]any{"replicaCount": 1}, []string{"upstream"}},
		{"replicas without redis", mergeValues(ok, map[string]any{"replicaCount": 3}),
			[]string{"replicaCount is 3 but redis.url is empty", "would not share invalidations"}},
		{"default replicas without redis", map[string]any{"upstream": map[string]any{"url": "http://synapse:8008"}},
			[]string{"replicaCount is 2 but redis.url is empty"}},
		{"wrong type", mergeValues(ok, map[string]any{"replicaCount": "two"}), []string{"replicaCount", "integer"}},
		{"unknown key", mergeValues(ok, map[string]any{"config": map[string]any{"cacheTtl": "5m"}}), []string{"cacheTtl"}},
		{"unknown top-level key", mergeValues(ok, map[string]any{"replicas": 2}), []string{"replicas"}},
		{"bad duration", mergeValues(ok, map[string]any{"config": map[string]any{"cacheTTL": "5 minutes"}}), []string{"cacheTTL"}},
		{"bad log level", mergeValues(ok, map[string]any{"config": map[string]any{"logLevel": "verbose"}}), []string{"logLevel"}},
		{"bad upstream", mergeValues(ok, map[string]any{"upstream": map[string]any{"url": "synapse:8008"}}), []string{"upstream", "url"}},
		{"bad redis url", mergeValues(ok, map[string]any{"redis": map[string]any{"url": "redis.example:6379"}}), []string{"redis.url is not a redis://"}},
		{"bad redis url not echoed", mergeValues(ok, map[string]any{"redis": map[string]any{"url": "http://:hunter2@redis:6379"}}), []string{"redis.url"}},
		{"introspection without secret", mergeValues(ok, map[string]any{"mas": map[string]any{"introspectionURL": "http://mas:8080/oauth2/introspect"}}),
			[]string{"mas.introspectionURL needs mas.secret.existingSecret"}},
		{"memory limit GOMEMLIMIT cannot be derived from", mergeValues(ok, map[string]any{"resources": map[string]any{"limits": map[string]any{"memory": "1G"}}}),
			[]string{"resources.limits.memory", "config.goMemLimit"}},
		{"grace too short", mergeValues(ok, map[string]any{"terminationGracePeriodSeconds": 20, "config": map[string]any{"shutdownDelay": "1m"}}),
			[]string{"terminationGracePeriodSeconds 20", "config.shutdownDelay"}},
		{"same ports", mergeValues(ok, map[string]any{"config": map[string]any{"adminPort": 8080}}), []string{"config.adminPort"}},
		{"auth port on the client port", mergeValues(ok, map[string]any{"config": map[string]any{"authPort": 8080}}), []string{"config.authPort"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := helmInstall(t, chrt, "bad", "matrix", c.vals, nil)
			if err == nil {
				t.Fatal("install succeeded; want it refused")
			}
			t.Log(err)
			if strings.Contains(err.Error(), "hunter2") {
				t.Errorf("the error shows the password in redis.url: %v", err)
			}
			for _, w := range c.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not say %q", err, w)
				}
			}
		})
	}
}

// TestHelmChartConfigRuns runs the release binary with the environment each
// documented install renders (addresses and the homeserver swapped for local
// ones, Redis left out, secrets stood in for): the binary accepts every
// value the chart writes.
func TestHelmChartConfigRuns(t *testing.T) {
	chrt := loadChart(t, chartDir)
	hs := fakeHomeserver(t)
	secretFile := filepath.Join(t.TempDir(), "mas-secret")
	if err := os.WriteFile(secretFile, []byte("a-mas-secret-of-some-length\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, c := range chartCases(t) {
		t.Run(c.name, func(t *testing.T) {
			o := renderChartCase(t, chrt, c)
			env := map[string]string{}
			for _, src := range o.deployments[0].Spec.Template.Spec.Containers[0].EnvFrom {
				for k, v := range o.configMap(t, src.ConfigMapRef.Name).Data {
					env[k] = v
				}
			}
			delete(env, "LISTEN_ADDR")
			delete(env, "ADMIN_ADDR")
			delete(env, "UPSTREAM_URL")
			delete(env, "SHUTDOWN_DELAY")
			env["REDIS_URL"] = ""
			env["TOKEN_HASH_KEY"] = strings.Repeat("k", minTokenHashKey)
			if env["MAS_SECRET_FILE"] != "" {
				env["MAS_SECRET_FILE"] = secretFile
			}
			if env["MAS_INTROSPECTION_URL"] != "" {
				env["MAS_INTROSPECTION_URL"] = hs.URL + "/oauth2/introspect"
			}
			p := startProxy(t, hs.URL, env)
			if code, body := get(t, p.ClientURL+"/_matrix/client/v3/account/whoami", "good"); code != 200 {
				t.Errorf("whoami through the proxy: %d %s", code, body)
			}
			// The metrics NOTES.txt tells the operator to look at exist.
			s := scrapeMetrics(t, p.AdminURL+"/metrics")
			for _, m := range metricName.FindAllString(o.rel.Info.Notes, -1) {
				if _, ok := s[m]; !ok {
					t.Errorf("NOTES.txt names %s, which the binary does not export", m)
				}
			}
		})
	}
}

// TestHelmChartExamplesDocumented: each example is a documented install
// (rendered and checked above) that says what it is for.
func TestHelmChartExamplesDocumented(t *testing.T) {
	examples, _ := filepath.Glob(filepath.Join(chartDir, "examples", "*.yaml"))
	if len(examples) == 0 {
		t.Fatal("no examples")
	}
	readme := readFile(t, "deploy", "README.md")
	for _, f := range examples {
		if !strings.HasPrefix(readFileAbs(t, f), "#") {
			t.Errorf("%s does not start with a comment saying what it is for", f)
		}
		if !strings.Contains(readme, filepath.Base(f)) {
			t.Errorf("%s is not mentioned in deploy/README.md", f)
		}
	}
}

func readFileAbs(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestHelmChartKeepsGeneratedSecrets renders the chart as an upgrade does
// against a cluster that already holds the chart's Secret (lookup answers
// with it): the generated TOKEN_HASH_KEY and REDIS_PASSWORD are the ones in
// the cluster, not new ones; without it (a first install) they are new and
// random.
func TestHelmChartKeepsGeneratedSecrets(t *testing.T) {
	chrt := loadChart(t, chartDir)
	vals := map[string]any{"upstream": map[string]any{"url": "http://synapse:8008"},
		"redis": map[string]any{"url": "redis://redis:6379", "password": map[string]any{"generate": true}}}
	const name = "up-matrix-auth-proxy"
	existing := map[string]any{
		"TOKEN_HASH_KEY": base64.StdEncoding.EncodeToString([]byte(strings.Repeat("o", 64))),
		"REDIS_PASSWORD": base64.StdEncoding.EncodeToString([]byte("the-password-redis-was-set-up-with")),
	}
	render := func(inCluster bool) map[string][]byte {
		t.Helper()
		rv, err := chartutil.ToRenderValuesWithSchemaValidation(chrt, vals,
			chartcommon.ReleaseOptions{Name: "up", Namespace: "matrix", Revision: 2, IsUpgrade: true}, chartcommon.DefaultCapabilities, false)
		if err != nil {
			t.Fatal(err)
		}
		e := engine.Engine{CustomTemplateFuncs: template.FuncMap{
			"lookup": func(apiVersion, kind, namespace, n string) (map[string]any, error) {
				if inCluster && apiVersion == "v1" && kind == "Secret" && namespace == "matrix" && n == name {
					return map[string]any{"data": existing}, nil
				}
				return map[string]any{}, nil
			},
		}}
		out, err := e.Render(chrt, rv)
		if err != nil {
			t.Fatal(err)
		}
		var s corev1.Secret
		if err := yaml.UnmarshalStrict([]byte(out["matrix-auth-proxy/templates/secret.yaml"]), &s); err != nil {
			t.Fatal(err)
		}
		if s.Name != name {
			t.Fatalf("Secret %q; want %q", s.Name, name)
		}
		return s.Data
	}
	kept := render(true)
	for k, v := range existing {
		if got := base64.StdEncoding.EncodeToString(kept[k]); got != v {
			t.Errorf("upgrade: %s = %q; want the cluster's %q", k, kept[k], v)
		}
	}
	first, second := render(false), render(false)
	for k := range existing {
		if len(first[k]) < minTokenHashKey || bytes.Equal(first[k], second[k]) || bytes.Equal(first[k], kept[k]) {
			t.Errorf("first install: %s = %q, then %q: want fresh random values", k, first[k], second[k])
		}
	}
}

// TestHelmChartScrapedByPrometheusYML: Prometheus without the operator,
// configured with monitoring/prometheus.yml, keeps the chart's pods: every
// keep rule of its pod discovery matches what the pod carries.
func TestHelmChartScrapedByPrometheusYML(t *testing.T) {
	var cfg struct {
		ScrapeConfigs []struct {
			JobName        string `json:"job_name"`
			RelabelConfigs []struct {
				SourceLabels []string `json:"source_labels"`
				Separator    string   `json:"separator"`
				Regex        string   `json:"regex"`
				Action       string   `json:"action"`
			} `json:"relabel_configs"`
		} `json:"scrape_configs"`
	}
	if err := yaml.Unmarshal([]byte(readFile(t, "deploy", "monitoring", "prometheus.yml")), &cfg); err != nil {
		t.Fatal(err)
	}
	o := renderChartCase(t, loadChart(t, chartDir), chartCases(t)[0])
	pod := o.deployments[0].Spec.Template
	ctr := pod.Spec.Containers[0]
	// The discovery labels of the target for the container's metrics port.
	meta := map[string]string{
		"__meta_kubernetes_pod_container_name":      ctr.Name,
		"__meta_kubernetes_pod_container_port_name": "metrics",
	}
	sanitize := strings.NewReplacer(".", "_", "/", "_", "-", "_")
	for k, v := range pod.Annotations {
		meta["__meta_kubernetes_pod_annotation_"+sanitize.Replace(k)] = v
	}
	for k, v := range pod.Labels {
		meta["__meta_kubernetes_pod_label_"+sanitize.Replace(k)] = v
	}
	keeps := 0
	for _, sc := range cfg.ScrapeConfigs {
		if sc.JobName != "matrix-auth-proxy" {
			continue
		}
		for _, rc := range sc.RelabelConfigs {
			if rc.Action != "keep" {
				continue
			}
			keeps++
			var vals []string
			for _, l := range rc.SourceLabels {
				vals = append(vals, meta[l])
			}
			sep := rc.Separator
			if sep == "" {
				sep = ";"
			}
			if re := regexp.MustCompile("^(?:" + rc.Regex + ")$"); !re.MatchString(strings.Join(vals, sep)) {
				t.Errorf("prometheus.yml keeps %v =~ %q; the chart's pod has %q", rc.SourceLabels, rc.Regex, strings.Join(vals, sep))
			}
		}
	}
	if keeps == 0 {
		t.Fatal("prometheus.yml: no keep rules in job matrix-auth-proxy")
	}
}

// TestHelmChartMatchesSidecar: a default install runs the proxy as the
// kustomize sidecar does: the same probes, resources, security context and
// shutdown settings (the sidecar's proxy.env), so one set of measurements
// and one runbook fit both.
func TestHelmChartMatchesSidecar(t *testing.T) {
	k := renderOnce(t, "kubernetes/example")
	side := k.workloads()[0].sidecar(t)
	sideEnv := proxyEnv(t, k, side)
	o := renderChartCase(t, loadChart(t, chartDir), chartCases(t)[0])
	ctr := o.deployments[0].Spec.Template.Spec.Containers[0]
	env := chartEnv(t, o, ctr)
	for _, c := range []struct {
		what        string
		chart, kust any
	}{
		{"startupProbe", ctr.StartupProbe, side.StartupProbe},
		{"livenessProbe", ctr.LivenessProbe, side.LivenessProbe},
		{"readinessProbe", ctr.ReadinessProbe, side.ReadinessProbe},
		{"resources", ctr.Resources, side.Resources},
		{"securityContext", ctr.SecurityContext, side.SecurityContext},
		{"ports", ctr.Ports, side.Ports},
	} {
		a, _ := json.Marshal(c.chart)
		b, _ := json.Marshal(c.kust)
		if !bytes.Equal(a, b) {
			t.Errorf("%s: chart %s; sidecar %s", c.what, a, b)
		}
	}
	for _, name := range []string{"SHUTDOWN_DELAY", "SHUTDOWN_TIMEOUT", "READINESS_INTERVAL", "LISTEN_ADDR", "ADMIN_ADDR", "CACHE_SIZE", "CACHE_TTL"} {
		if env[name] != sideEnv[name] {
			t.Errorf("%s = %q; the sidecar has %q", name, env[name], sideEnv[name])
		}
	}
}
