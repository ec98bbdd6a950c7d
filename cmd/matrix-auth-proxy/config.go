package main

import (
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/netip"
	"net/url"
	"os"
	"reflect"
	"strconv"
	"strings"
	"time"

	"github.com/caarlos0/env/v11"
	"go.uber.org/zap/zapcore"

	"github.com/matrix-auth-proxy/matrix-auth-proxy/proxy"
)

// Config is the whole configuration: environment variables only. README.md
// documents each variable; keep the two in step.
type Config struct {
	UpstreamURL       string        `env:"UPSTREAM_URL" envDefault:"http://127.0.0.1:8008"`
	ListenAddr        string        `env:"LISTEN_ADDR" envDefault:":8080"`
	AdminAddr         string        `env:"ADMIN_ADDR" envDefault:":9090"`
	AuthAddr          string        `env:"AUTH_ADDR"`
	CacheSize         int           `env:"CACHE_SIZE" envDefault:"100000"`
	CacheTTL          time.Duration `env:"CACHE_TTL" envDefault:"2m"`
	CacheNegativeTTL  time.Duration `env:"CACHE_NEGATIVE_TTL" envDefault:"10s"`
	UpstreamTimeout   time.Duration `env:"UPSTREAM_TIMEOUT" envDefault:"10s"`
	RevokeTimeout     time.Duration `env:"REVOKE_TIMEOUT" envDefault:"60s"`
	BodyReadTimeout   time.Duration `env:"BODY_READ_TIMEOUT" envDefault:"10s"`
	ReadinessInterval time.Duration `env:"READINESS_INTERVAL" envDefault:"5s"`
	ShutdownDelay     time.Duration `env:"SHUTDOWN_DELAY" envDefault:"5s"`
	ShutdownTimeout   time.Duration `env:"SHUTDOWN_TIMEOUT" envDefault:"20s"`
	LogLevel          string        `env:"LOG_LEVEL" envDefault:"info"`
	LogFormat         string        `env:"LOG_FORMAT" envDefault:"json"`

	RateLimitRPS         float64  `env:"RATE_LIMIT_RPS" envDefault:"20"`
	RateLimitBurst       int      `env:"RATE_LIMIT_BURST" envDefault:"100"`
	RateLimitExemptUsers []string `env:"RATE_LIMIT_EXEMPT_USERS" envSeparator:","`
	RateLimitExemptCIDRs []string `env:"RATE_LIMIT_EXEMPT_CIDRS" envSeparator:","`
	TrustedProxies       []string `env:"TRUSTED_PROXIES" envSeparator:","`

	TokenHashKey      string        `env:"TOKEN_HASH_KEY"`
	RedisURL          string        `env:"REDIS_URL"`
	RedisPassword     string        `env:"REDIS_PASSWORD"`
	RedisChannel      string        `env:"REDIS_CHANNEL" envDefault:"matrix-auth-proxy:invalidate"`
	RedisDownCacheTTL time.Duration `env:"REDIS_DOWN_CACHE_TTL" envDefault:"10s"`

	ServerName          string `env:"SERVER_NAME"`
	MASIntrospectionURL string `env:"MAS_INTROSPECTION_URL"`
	MASSecret           string `env:"MAS_SECRET"`
	MASSecretFile       string `env:"MAS_SECRET_FILE"`

	// Derived by loadConfig.
	upstream    *url.URL
	level       zapcore.Level
	exemptCIDRs []netip.Prefix
	trusted     []netip.Prefix
	exemptUsers []string
	masURL      *url.URL
	masSecret   string // MAS_SECRET, or MAS_SECRET_FILE's content
}

// configError names the environment variable that is wrong, never the Go
// field: the operator writes manifests, not Go.
type configError struct {
	Var, Problem string
}

func (e *configError) Error() string { return e.Var + ": " + e.Problem }

// loadConfig reads the configuration from environ (the process environment
// in production, a map in tests) and checks every value.
func loadConfig(environ map[string]string) (Config, error) {
	cfg, err := env.ParseAsWithOptions[Config](env.Options{Environment: environ})
	if err != nil {
		return cfg, translateEnvError(err, environ)
	}
	return cfg, cfg.validate()
}

// translateEnvError turns caarlos0/env's errors, which name struct fields,
// into configErrors naming variables. Only the first is reported: one line.
func translateEnvError(err error, environ map[string]string) error {
	var agg env.AggregateError
	if errors.As(err, &agg) && len(agg.Errors) > 0 {
		err = agg.Errors[0]
	}
	var pe env.ParseError
	if !errors.As(err, &pe) {
		return err
	}
	f, ok := reflect.TypeFor[Config]().FieldByName(pe.Name)
	if !ok {
		return err
	}
	name, _, _ := strings.Cut(f.Tag.Get("env"), ",")
	val := strconv.Quote(environ[name])
	switch f.Type {
	case reflect.TypeFor[time.Duration]():
		return &configError{name, val + " is not a duration (use Go syntax: 500ms, 10s, 2m, 1h)"}
	case reflect.TypeFor[int]():
		return &configError{name, val + " is not a whole number"}
	case reflect.TypeFor[float64]():
		return &configError{name, val + " is not a number"}
	}
	return &configError{name, val + " is not valid: " + pe.Err.Error()}
}

func (c *Config) validate() error {
	u, err := url.Parse(c.UpstreamURL)
	switch {
	case err != nil:
		// url.Parse quotes the URL in its errors: a password in it must
		// not reach the log.
		return &configError{"UPSTREAM_URL", "is not a URL"}
	case u.Scheme != "http" && u.Scheme != "https", u.Host == "":
		return &configError{"UPSTREAM_URL", fmt.Sprintf("%q must be http:// or https:// with a host, like http://127.0.0.1:8008", u.Redacted())}
	case u.RawQuery != "" || u.Fragment != "" || u.User != nil:
		return &configError{"UPSTREAM_URL", fmt.Sprintf("%q must not carry a query, fragment or user info", u.Redacted())}
	}
	c.upstream = u
	for _, a := range []struct{ name, val string }{{"LISTEN_ADDR", c.ListenAddr}, {"ADMIN_ADDR", c.AdminAddr}} {
		if err := checkAddr(a.val); err != nil {
			return &configError{a.name, fmt.Sprintf("%q %v", a.val, err)}
		}
	}
	if c.ListenAddr == c.AdminAddr {
		return &configError{"ADMIN_ADDR", fmt.Sprintf("%q is also LISTEN_ADDR: metrics must never be served to clients", c.AdminAddr)}
	}
	if c.AuthAddr != "" {
		if err := checkAddr(c.AuthAddr); err != nil {
			return &configError{"AUTH_ADDR", fmt.Sprintf("%q %v", c.AuthAddr, err)}
		}
		if c.AuthAddr == c.ListenAddr || c.AuthAddr == c.AdminAddr {
			return &configError{"AUTH_ADDR", fmt.Sprintf("%q is also LISTEN_ADDR or ADMIN_ADDR: the forward-auth endpoint needs a listener of its own, which only the ingress reaches", c.AuthAddr)}
		}
	}
	if c.CacheSize < 1 {
		return &configError{"CACHE_SIZE", fmt.Sprintf("%d must be at least 1", c.CacheSize)}
	}
	for _, d := range []struct {
		name   string
		val    time.Duration
		zeroOK bool
	}{
		{"CACHE_TTL", c.CacheTTL, false},
		{"CACHE_NEGATIVE_TTL", c.CacheNegativeTTL, true}, // 0 disables negative caching
		{"UPSTREAM_TIMEOUT", c.UpstreamTimeout, false},
		{"REVOKE_TIMEOUT", c.RevokeTimeout, false},
		{"BODY_READ_TIMEOUT", c.BodyReadTimeout, false},
		{"READINESS_INTERVAL", c.ReadinessInterval, false},
		{"SHUTDOWN_DELAY", c.ShutdownDelay, true},
		{"SHUTDOWN_TIMEOUT", c.ShutdownTimeout, true},
	} {
		if d.val < 0 || (d.val == 0 && !d.zeroOK) {
			want := "must be positive"
			if d.zeroOK {
				want = "must not be negative"
			}
			return &configError{d.name, fmt.Sprintf("%s %s", d.val, want)}
		}
	}
	if c.level, err = zapcore.ParseLevel(c.LogLevel); err != nil {
		return &configError{"LOG_LEVEL", fmt.Sprintf("%q is not one of debug, info, warn, error", c.LogLevel)}
	}
	if c.LogFormat != "json" && c.LogFormat != "console" {
		return &configError{"LOG_FORMAT", fmt.Sprintf("%q is not json or console", c.LogFormat)}
	}
	if err := c.validateRateLimit(); err != nil {
		return err
	}
	if err := c.validateMAS(); err != nil {
		return err
	}
	return c.validateBus()
}

// validateMAS checks the Matrix Authentication Service settings. The
// secret is never echoed, nor is a URL that might carry one.
func (c *Config) validateMAS() error {
	if c.ServerName != "" && (strings.ContainsAny(c.ServerName, "/@ \t") || strings.HasPrefix(c.ServerName, ":")) {
		return &configError{"SERVER_NAME", fmt.Sprintf("%q is not a Matrix server name like example.org", c.ServerName)}
	}
	switch {
	case c.MASSecret != "" && c.MASSecretFile != "":
		return &configError{"MAS_SECRET_FILE", "must not be set together with MAS_SECRET: use one"}
	case c.MASSecretFile != "":
		b, err := readSecretFile(c.MASSecretFile)
		if err != nil {
			return &configError{"MAS_SECRET_FILE", fmt.Sprintf("%q cannot be read: %v", c.MASSecretFile, err)}
		}
		// Synapse strips the file's content the same way.
		if c.masSecret = strings.TrimSpace(string(b)); c.masSecret == "" {
			return &configError{"MAS_SECRET_FILE", fmt.Sprintf("%q is empty", c.MASSecretFile)}
		}
	default:
		c.masSecret = c.MASSecret
	}
	if c.MASIntrospectionURL == "" {
		return nil
	}
	u, err := url.Parse(c.MASIntrospectionURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.User != nil {
		return &configError{"MAS_INTROSPECTION_URL", "is not an http:// or https:// URL with a host and no user info, like http://mas:8080/oauth2/introspect"}
	}
	if c.masSecret == "" {
		return &configError{"MAS_INTROSPECTION_URL", "needs MAS_SECRET or MAS_SECRET_FILE (matrix.secret of MAS, the secret Synapse uses)"}
	}
	c.masURL = u
	return nil
}

// minHashKey is the shortest TOKEN_HASH_KEY accepted: 32 characters, e.g.
// the output of `openssl rand -hex 16`.
const minHashKey = 32

func (c *Config) validateBus() error {
	if c.TokenHashKey != "" && len(c.TokenHashKey) < minHashKey {
		return &configError{"TOKEN_HASH_KEY", fmt.Sprintf("is %d characters; use at least %d random ones (openssl rand -hex 32)", len(c.TokenHashKey), minHashKey)}
	}
	if c.RedisURL == "" {
		return nil
	}
	if u, err := url.Parse(c.RedisURL); err != nil || (u.Scheme != "redis" && u.Scheme != "rediss") || u.Host == "" {
		// Never echo the value: it may carry a password.
		return &configError{"REDIS_URL", "is not a redis:// or rediss:// URL with a host"}
	}
	if c.TokenHashKey == "" {
		return &configError{"TOKEN_HASH_KEY", "must be set (the same on every replica) when REDIS_URL is: replicas name tokens by their keyed hash"}
	}
	if c.RedisDownCacheTTL <= 0 {
		return &configError{"REDIS_DOWN_CACHE_TTL", fmt.Sprintf("%s must be positive", c.RedisDownCacheTTL)}
	}
	return nil
}

func (c *Config) validateRateLimit() error {
	if c.RateLimitRPS < 0 || math.IsNaN(c.RateLimitRPS) || math.IsInf(c.RateLimitRPS, 0) {
		return &configError{"RATE_LIMIT_RPS", fmt.Sprintf("%v must be a number of requests per second, 0 or more (0 disables rate limiting)", c.RateLimitRPS)}
	}
	if c.RateLimitBurst < 1 {
		return &configError{"RATE_LIMIT_BURST", fmt.Sprintf("%d must be at least 1", c.RateLimitBurst)}
	}
	for _, u := range c.RateLimitExemptUsers {
		u = strings.TrimSpace(u)
		if u == "" {
			continue
		}
		if local, server, ok := strings.Cut(u, ":"); !ok || len(local) < 2 || local[0] != '@' || server == "" {
			return &configError{"RATE_LIMIT_EXEMPT_USERS", fmt.Sprintf("%q is not a Matrix user ID like @bridge:example.org", u)}
		}
		c.exemptUsers = append(c.exemptUsers, u)
	}
	var bad string
	var ok bool
	if c.exemptCIDRs, bad, ok = proxy.ParsePrefixes(c.RateLimitExemptCIDRs); !ok {
		return &configError{"RATE_LIMIT_EXEMPT_CIDRS", fmt.Sprintf("%q is not a CIDR like 10.0.0.0/8 or an address", bad)}
	}
	if c.trusted, bad, ok = proxy.ParsePrefixes(c.TrustedProxies); !ok {
		return &configError{"TRUSTED_PROXIES", fmt.Sprintf("%q is not a CIDR like 10.0.0.0/8 or an address", bad)}
	}
	return nil
}

func checkAddr(addr string) error {
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return errors.New("is not host:port (e.g. :8080 or 127.0.0.1:8080)")
	}
	if n, err := strconv.Atoi(port); err != nil || n < 0 || n > 65535 {
		return errors.New("has no valid port number")
	}
	return nil
}

// maxSecretFile bounds what MAS_SECRET_FILE may hold.
const maxSecretFile = 4 << 10

func readSecretFile(name string) ([]byte, error) {
	f, err := os.Open(name)
	if err != nil {
		var pe *os.PathError
		if errors.As(err, &pe) {
			return nil, pe.Err
		}
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxSecretFile+1))
	if err != nil {
		return nil, errors.New("read failed")
	}
	if len(b) > maxSecretFile {
		return nil, errors.New("is over 4 KiB")
	}
	return b, nil
}
