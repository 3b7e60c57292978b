// Package secret holds values that must never reach logs, traces, metrics or
// error messages: broker URLs with passwords, connection strings, API keys.
//
// A Value prints as [REDACTED] through fmt, log/slog and encoding/json; only
// Reveal returns the real value, at the one place that hands it to a client
// library. Values are immutable and safe for concurrent use.
package secret

import (
	"log/slog"
	"net/url"
	"strings"
)

const redacted = "[REDACTED]"

// Value is a secret string.
type Value string

// Reveal returns the secret itself. Call it only where a client library
// needs it, never for logging.
func (v Value) Reveal() string { return string(v) }

// IsZero reports whether no secret is set.
func (v Value) IsZero() bool { return v == "" }

func (v Value) String() string                { return mask(string(v)) }
func (v Value) GoString() string              { return mask(string(v)) }
func (v Value) LogValue() slog.Value          { return slog.StringValue(mask(string(v))) }
func (v Value) MarshalJSON() ([]byte, error)  { return []byte(`"` + mask(string(v)) + `"`), nil }
func (v Value) MarshalText() ([]byte, error)  { return []byte(mask(string(v))), nil }
func (v *Value) UnmarshalText(b []byte) error { *v = Value(b); return nil }

func mask(s string) string {
	if s == "" {
		return ""
	}
	return redacted
}

// URL returns u with its password (and any query string, which may hold
// keys) replaced, for logs and errors. A value that does not parse as a URL
// is redacted whole.
func URL(u string) string {
	p, err := url.Parse(u)
	if err != nil || p.Host == "" {
		return redacted
	}
	if _, has := p.User.Password(); has {
		p.User = url.UserPassword(p.User.Username(), "xxxxx")
	}
	if p.RawQuery != "" {
		p.RawQuery = "redacted"
	}
	return p.String()
}

// Scrub replaces every occurrence of the secrets in s. Use it on error text
// from libraries that may echo what they were given.
func Scrub(s string, secrets ...Value) string {
	for _, v := range secrets {
		if len(v) >= 4 {
			s = strings.ReplaceAll(s, string(v), redacted)
		}
	}
	return s
}
