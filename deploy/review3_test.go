package deploy

import (
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
