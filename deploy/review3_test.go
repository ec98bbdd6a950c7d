package deploy

import (
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"sigs.k8s.io/yaml"
)

// Adversarial review of the Helm chart and its ESS wiring (review 3).

// TestReview3TrustedRangeOnlyReachesTrustingPorts: the proxy believes the
// X-Forwarded-For of every peer in TRUSTED_PROXIES, and keys rate limiting
// (and the address it reports to the homeserver) on it. A documented
// install that trusts the whole pod network (10.0.0.0/8: the ESS values and
// examples/redis-replicas.yaml) must then not let any pod reach the client
// or forward-auth port: otherwise any pod in the cluster, in any namespace,
// sends a fresh X-Forwarded-For with each request and gets a fresh
// rate-limit bucket each time (the issue's "never reachable in a way that
// lets a client skip the proxy's rate limiting").
func TestReview3TrustedRangeOnlyReachesTrustingPorts(t *testing.T) {
	chrt := loadChart(t, chartDir)
	attacker := map[string]string{"app.kubernetes.io/name": "review3-any-pod"}
	checked := 0
	for _, c := range chartCases(t) {
		tp, _ := c.vals["trustedProxies"].([]any)
		if len(tp) == 0 {
			continue
		}
		t.Run(c.name, func(t *testing.T) {
			o := renderChartCase(t, chrt, c)
			if len(o.policies) != 1 {
				t.Skipf("%d NetworkPolicies", len(o.policies))
			}
			checked++
			ctr := o.deployments[0].Spec.Template.Spec.Containers[0]
			for _, name := range []string{"client", "auth"} {
				port := namedPort(ctr, name)
				if port == 0 {
					continue
				}
				if admits(o.policies[0], attacker, port, ctr) {
					t.Errorf("trustedProxies %v, yet the NetworkPolicy lets any pod reach port %s (%d): "+
						"any pod chooses its X-Forwarded-For, so its rate-limit bucket", tp, name, port)
				}
			}
		})
	}
	if checked == 0 {
		t.Fatal("no documented install trusts a proxy range; nothing checked")
	}
}

// TestReview3SchemaRejectsMistakes: values.schema.json (or the chart's own
// checks) refuses values that cannot work, naming them, at render time
// rather than as a crash-looping pod or a setting silently dropped.
func TestReview3SchemaRejectsMistakes(t *testing.T) {
	chrt := loadChart(t, chartDir)
	ok := map[string]any{"replicaCount": 1, "upstream": map[string]any{"url": "http://synapse:8008"}}
	for _, c := range []struct {
		name string
		vals map[string]any
		want string
	}{
		// A typo in resources: the pod runs without the limit, and
		// GOMEMLIMIT is not derived; nothing says so.
		{"resources typo", mergeValues(ok, map[string]any{"resources": map[string]any{"limit": map[string]any{"memory": "1Gi"}}}), "limit"},
		{"resources.limits typo", mergeValues(ok, map[string]any{"resources": map[string]any{"limits": map[string]any{"memroy": "1Gi"}}}), "memroy"},
		// TRUSTED_PROXIES / RATE_LIMIT_EXEMPT_CIDRS the binary cannot parse:
		// rendered, then the pod crash-loops.
		{"trusted proxy not a CIDR", mergeValues(ok, map[string]any{"trustedProxies": []any{"10.0.0.0/33"}}), "trustedProxies"},
		{"exempt CIDR not a CIDR", mergeValues(ok, map[string]any{"rateLimit": map[string]any{"exemptCIDRs": []any{"pods"}}}), "exemptCIDRs"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := helmInstall(t, chrt, "bad", "matrix", c.vals, nil)
			if err == nil {
				t.Fatalf("install of %v succeeded; want it refused naming %q", c.vals, c.want)
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Errorf("error %q does not name %q", err, c.want)
			}
		})
	}
}

// renderESSValues renders matrix-stack from its complete CI example with
// extra on top, then the proxy's ESS values file, decoded as renderESS
// does; the result is stored under variant v for loadESSWiring.
func renderESSValues(t *testing.T, v essVariant, extra map[string]any) {
	t.Helper()
	renderESSLayers(t, v, extra, valuesFile(t, "helm/ess/matrix-stack-values.yaml"))
}

// renderESSLayers is renderESSValues with the layers given.
func renderESSLayers(t *testing.T, v essVariant, layers ...map[string]any) {
	t.Helper()
	dir := essChartDir(t)
	vals := mergeValues(append([]map[string]any{valuesFile(t, dir+"/ci/example-default-enabled-components-values.yaml")}, layers...)...)
	rel, err := helmInstall(t, loadChart(t, dir), essRelease, essNamespace, vals, prometheusOperatorAPIs)
	if err != nil {
		t.Fatalf("render matrix-stack: %v", err)
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
		default:
			continue
		}
		if err := yaml.Unmarshal(js, into); err != nil {
			t.Fatalf("%s: %v", meta.Kind, err)
		}
	}
	essRenders[essRenderKey{v, true}] = o
}

// TestReview3ESSWithoutMASRevocationsReachProxy: ESS runs without MAS too
// (matrixAuthenticationService.enabled: false; ESS's own worker CI example
// does). The values files do not say they need MAS, and ESS renders with
// them; but then Synapse itself serves logout, device deletion, password
// changes and deactivation, and HAProxy sends those straight to Synapse:
// the proxy never sees them, so a token logged out stays valid at the
// cached whoami for CACHE_TTL instead of being dropped at once.
func TestReview3ESSWithoutMASRevocationsReachProxy(t *testing.T) {
	v := essVariant{name: "review3-without-mas"}
	renderESSValues(t, v, map[string]any{"matrixAuthenticationService": map[string]any{"enabled": false}})
	w := loadESSWiring(t, v)
	host := synapseHost(t)
	if hops := w.follow(t, "GET", "/_matrix/client/v3/account/whoami", w.ess.ingressRoute(t, host, "/_matrix/client/v3/account/whoami")); !w.viaProxy(hops) {
		t.Fatalf("whoami does not reach the proxy either: %v", hops)
	}
	for _, rq := range []struct{ method, path string }{
		{"POST", "/_matrix/client/v3/logout"},
		{"POST", "/_matrix/client/v3/logout/all"},
		{"DELETE", "/_matrix/client/v3/devices/ABCDEF"},
		{"POST", "/_matrix/client/v3/delete_devices"},
		{"POST", "/_matrix/client/v3/account/password"},
		{"POST", "/_matrix/client/v3/account/deactivate"},
	} {
		hops := w.follow(t, rq.method, rq.path, w.ess.ingressRoute(t, host, rq.path))
		if !w.viaProxy(hops) {
			t.Errorf("%s %s revokes tokens but does not pass the proxy: %v", rq.method, rq.path, hops)
		}
	}
}

// TestReview3ESSMASSecretExists: matrix-auth-proxy-values.yaml mounts MAS's
// secret from Secret ess-generated, key MAS_SYNAPSE_SHARED_SECRET. ESS
// generates that key only when it makes the secret itself: an ESS whose
// values give matrixAuthenticationService.synapseSharedSecret (or run
// without MAS) has no such key, the proxy's pod never starts
// (CreateContainerConfigError), and HAProxy answers every whoami with 503.
func TestReview3ESSMASSecretExists(t *testing.T) {
	dir := essChartDir(t)
	base := valuesFile(t, dir+"/ci/example-default-enabled-components-values.yaml")
	stack := valuesFile(t, "helm/ess/matrix-stack-values.yaml")
	proxyVals := valuesFile(t, "helm/ess/matrix-auth-proxy-values.yaml")
	sec := proxyVals["mas"].(map[string]any)["secret"].(map[string]any)
	want := essRelease + "-generated:" + sec["existingSecretKey"].(string)
	if sec["existingSecret"] != essRelease+"-generated" {
		t.Fatalf("the values mount %v, no longer ESS's generated Secret; revisit this test", sec)
	}
	for _, tc := range []struct {
		name  string
		extra map[string]any
	}{
		{"ESS generates MAS's secret", nil},
		{"operator gives MAS's secret", map[string]any{"matrixAuthenticationService": map[string]any{
			"synapseSharedSecret": map[string]any{"value": "operator-chosen-secret"}}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			vals := mergeValues(base, stack)
			if tc.extra != nil {
				vals = mergeValues(vals, tc.extra)
			}
			rel, err := helmInstall(t, loadChart(t, dir), essRelease, essNamespace, vals, prometheusOperatorAPIs)
			if err != nil {
				t.Fatal(err)
			}
			all := rel.Manifest
			for _, h := range rel.Hooks {
				all += "\n" + h.Manifest
			}
			if !strings.Contains(all, want) {
				t.Errorf("ESS creates no %s, which matrix-auth-proxy-values.yaml mounts: the proxy's pod cannot start and every whoami HAProxy sends it fails", want)
			}
		})
	}
}

// TestReview3ExposedServiceKeepsAuthAndAdminInternal: the schema offers
// service.type NodePort and LoadBalancer (to expose the client port), and
// the same Service carries the forward-auth port ("Keep AUTH_ADDR
// unreachable from outside the cluster", README) and the admin port
// ("Never exposed"). With an externally reachable Service they are on every
// node or on the load balancer; only a NetworkPolicy (optional, and not
// enforced by every CNI) stands in front of /metrics, and nothing in front
// of the auth port, which the NetworkPolicy opens to all. Behind a
// load balancer with externalTrafficPolicy Cluster, clients arrive from
// node addresses, often inside the trustedProxies of the examples
// (10.0.0.0/8): their own X-Forwarded-For is then believed.
func TestReview3ExposedServiceKeepsAuthAndAdminInternal(t *testing.T) {
	chrt := loadChart(t, chartDir)
	for _, typ := range []string{"NodePort", "LoadBalancer"} {
		t.Run(typ, func(t *testing.T) {
			vals := map[string]any{"replicaCount": 1, "upstream": map[string]any{"url": "http://synapse:8008"},
				"config":         map[string]any{"authPort": 8081},
				"trustedProxies": []any{"10.0.0.0/8"},
				"service":        map[string]any{"type": typ}}
			rel, err := helmInstall(t, chrt, "exposed", "matrix", vals, nil)
			if err != nil {
				return // refused: fine
			}
			o := decodeChart(t, typ, rel)
			for _, svc := range o.services {
				if svc.Spec.Type != "NodePort" && svc.Spec.Type != "LoadBalancer" {
					continue
				}
				for _, p := range svc.Spec.Ports {
					if p.Name == "auth" || p.Name == "metrics" {
						t.Errorf("Service %s (type %s) exposes port %s (%d) outside the cluster", svc.Name, svc.Spec.Type, p.Name, p.Port)
					}
				}
			}
		})
	}
}

// TestReview3GeneratedKeyStableWithoutLookup: "TOKEN_HASH_KEY ... is
// generated once into the chart's Secret and kept across upgrades
// (lookup)". lookup finds nothing whenever the chart is rendered without
// the cluster: helm template, and so Argo CD and Flux's post-renderers
// built on it. Each sync then writes a new key; replicas started before
// and after it hash tokens differently, and a token-scoped invalidation one
// replica publishes on the bus (hex TokenIDs) names nothing on the others:
// a logout through one replica leaves the token cached on the rest until
// CACHE_TTL. Two offline renders must agree, or the chart must refuse to
// render offline without tokenHashKey.existingSecret.
func TestReview3GeneratedKeyStableWithoutLookup(t *testing.T) {
	chrt := loadChart(t, chartDir)
	vals := map[string]any{"replicaCount": 2, "upstream": map[string]any{"url": "http://synapse:8008"},
		"redis": map[string]any{"url": "redis://redis:6379"}}
	var keys []string
	for range 2 {
		rel, err := helmInstall(t, chrt, "gitops", "matrix", vals, nil)
		if err != nil {
			return // refused offline: fine
		}
		o := decodeChart(t, "gitops", rel)
		s := o.secret("gitops-matrix-auth-proxy")
		if s == nil {
			t.Fatal("no chart Secret rendered")
		}
		k := string(s.Data["TOKEN_HASH_KEY"])
		if k == "" {
			t.Fatal("the chart Secret has no TOKEN_HASH_KEY")
		}
		keys = append(keys, k)
	}
	if keys[0] != keys[1] {
		t.Errorf("two offline renders of the same values generate different TOKEN_HASH_KEYs: replicas of a GitOps-managed release would hash tokens differently after a sync")
	}
}

// TestReview3ESSKeepsOperatorsAdditionalPaths: the README's command is
// "-f your-ess-values.yaml -f deploy/helm/ess/matrix-stack-values.yaml"
// ("three HAProxy paths, nothing else changes"). Helm replaces lists, it
// does not merge them: an operator's own synapse.ingress.additionalPaths (a
// bridge's provisioning API, a widget service) are silently dropped.
func TestReview3ESSKeepsOperatorsAdditionalPaths(t *testing.T) {
	operator := map[string]any{"synapse": map[string]any{"ingress": map[string]any{"additionalPaths": []any{
		map[string]any{"path": "/_matrix/bridge-provisioning", "availability": "only_externally",
			"service": map[string]any{"name": "my-bridge", "port": map[string]any{"number": 9000}}},
	}}}}
	host := synapseHost(t)
	// Control: ESS alone sends the path to the bridge.
	ctl := essVariant{name: "review3-operator-paths-alone"}
	renderESSLayers(t, ctl, operator)
	if got := essRenders[essRenderKey{ctl, true}].ingressRoute(t, host, "/_matrix/bridge-provisioning/v1/x"); got.service != "my-bridge" {
		t.Fatalf("control: without the proxy's values the path goes to %v; this test proves nothing", got)
	}
	v := essVariant{name: "review3-operator-paths"}
	renderESSValues(t, v, operator)
	o := essRenders[essRenderKey{v, true}]
	if got := o.ingressRoute(t, host, "/_matrix/bridge-provisioning/v1/x"); got.service != "my-bridge" {
		t.Errorf("the operator's additional path now goes to %v, not my-bridge: matrix-stack-values.yaml replaced the list", got)
	}
}
