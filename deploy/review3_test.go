package deploy

import (
	"strings"
	"testing"
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
