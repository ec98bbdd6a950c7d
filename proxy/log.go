package proxy

import (
	"net/url"
	"strings"
)

// secretParams are query parameters whose values must never reach a log
// line: access tokens (Client-Server API, "Using access tokens"), SSO login
// tokens, registration tokens and 3PID session secrets.
var secretParams = [...]string{"access_token", "loginToken", "login_token", "token", "client_secret", "refresh_token", "password"}

// redactQuery returns a raw query with the values of secretParams replaced by
// "REDACTED". A query that does not parse is dropped whole: it might still
// hold a token.
func redactQuery(raw string) string {
	if raw == "" {
		return ""
	}
	q, err := url.ParseQuery(raw)
	if err != nil {
		return "UNPARSEABLE-REDACTED"
	}
	// Names are compared without case, in case a homeserver reads them
	// loosely.
	for k, vs := range q {
		for _, s := range secretParams {
			if strings.EqualFold(k, s) {
				for i := range vs {
					vs[i] = "REDACTED"
				}
			}
		}
	}
	return q.Encode()
}
