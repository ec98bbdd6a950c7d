package proxy

import (
	"errors"
	"fmt"
	"net/url"
	"strings"
	"sync"
)

// authPolicy is what a service protected by the forward-auth endpoint
// admits, beyond "a valid token". It is chosen by the auth URL the ingress
// is configured with (the query of /auth, or the policy segment of
// /envoy/{policy}/…): the operator's configuration, never the client's, so
// one proxy serves several services with different policies.
type authPolicy struct {
	// guests: guest tokens pass (guests=allow). Off by default: a guest
	// account is one anybody can make.
	guests bool
	// users and servers: when either is non-empty, only these users, or
	// users of these servers, pass (users=@alice:example.org,@*:example.org).
	users   map[string]struct{}
	servers map[string]struct{}
	// admins: only homeserver admins pass (admin=true), as the homeserver
	// says when asked with the user's own token (see isAdmin).
	admins bool
}

// policyParams is every parameter a policy may carry and what its value
// does. A parameter not listed here makes the policy invalid: a typo must
// not silently open a service.
var policyParams = map[string]func(pl *authPolicy, v string) error{
	"guests": func(pl *authPolicy, v string) error {
		var ok bool
		pl.guests, ok = map[string]bool{"allow": true, "deny": false}[v]
		if !ok {
			return errors.New(`guests must be "allow" or "deny"`)
		}
		return nil
	},
	"users": func(pl *authPolicy, v string) error {
		for u := range strings.SplitSeq(v, ",") {
			local, server, ok := strings.Cut(strings.TrimSpace(u), ":")
			if !ok || len(local) < 2 || local[0] != '@' || server == "" {
				return errors.New("users must be a comma-separated list of user IDs (@alice:example.org) or servers (@*:example.org)")
			}
			if local == "@*" {
				pl.servers[server] = struct{}{}
			} else {
				pl.users[local+":"+server] = struct{}{}
			}
		}
		return nil
	},
	"admin": func(pl *authPolicy, v string) error {
		var ok bool
		pl.admins, ok = map[string]bool{"true": true, "false": false}[v]
		if !ok {
			return errors.New(`admin must be "true" or "false"`)
		}
		return nil
	},
}

// maxPolicyLen bounds a policy: a list of a few hundred users fits.
const maxPolicyLen = 16 << 10

// parsePolicy reads a policy written as a query string. Errors name the
// parameter only when it is a known one: an unknown name may be anything,
// a token pasted in the wrong place included.
func parsePolicy(raw string) (*authPolicy, error) {
	pl := &authPolicy{users: map[string]struct{}{}, servers: map[string]struct{}{}}
	if len(raw) > maxPolicyLen {
		return nil, errors.New("policy over 16 KiB")
	}
	// A policy is written by the operator, not form-encoded: '+' is a
	// literal (Synapse allows it in user IDs), not a space.
	q, err := url.ParseQuery(strings.ReplaceAll(raw, "+", "%2B"))
	if err != nil {
		return nil, errors.New("policy is not a query string")
	}
	for name, vals := range q {
		set, ok := policyParams[name]
		if !ok {
			return nil, errors.New("policy has a parameter that is none of guests, users, admin")
		}
		for _, v := range vals {
			if err := set(pl, v); err != nil {
				return nil, fmt.Errorf("policy parameter %s: %w", name, err)
			}
		}
	}
	return pl, nil
}

// Why a valid token is refused.
var (
	errAuthGuest     = matrixError{403, "M_FORBIDDEN", "Guest access is not allowed here"}
	errAuthNotListed = matrixError{403, "M_FORBIDDEN", "This service is not open to this user"}
	errAuthNotAdmin  = matrixError{403, "M_FORBIDDEN", "This service is open to homeserver admins only"}
)

// refusal says why the policy refuses user (a guest or not) before any
// admin check, or nil.
func (pl *authPolicy) refusal(user string, guest bool) *matrixError {
	if guest && !pl.guests {
		return &errAuthGuest
	}
	if len(pl.users) == 0 && len(pl.servers) == 0 {
		return nil
	}
	if _, ok := pl.users[user]; ok {
		return nil
	}
	if _, server, ok := strings.Cut(user, ":"); ok {
		if _, ok := pl.servers[server]; ok {
			return nil
		}
	}
	return &errAuthNotListed
}

// policyCache holds parsed policies by their raw text, so an allowed
// request costs no parsing. Valid policies only, at most maxPolicies: the
// auth URLs an operator configured are a handful, and a caller of the auth
// listener spraying others gets them parsed each time, not stored.
type policyCache struct {
	mu sync.RWMutex
	m  map[string]*authPolicy
}

const maxPolicies = 64

func (pc *policyCache) get(raw string) (*authPolicy, error) {
	pc.mu.RLock()
	pl := pc.m[raw]
	pc.mu.RUnlock()
	if pl != nil {
		return pl, nil
	}
	pl, err := parsePolicy(raw)
	if err != nil {
		return nil, err
	}
	pc.mu.Lock()
	if pc.m == nil {
		pc.m = map[string]*authPolicy{}
	}
	if len(pc.m) < maxPolicies {
		// A copy: raw may share its bytes with the whole request head
		// (proxy/fastlane).
		pc.m[strings.Clone(raw)] = pl
	}
	pc.mu.Unlock()
	return pl, nil
}

func (pc *policyCache) len() int {
	pc.mu.RLock()
	defer pc.mu.RUnlock()
	return len(pc.m)
}
