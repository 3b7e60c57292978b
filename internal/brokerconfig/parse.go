package brokerconfig

import (
	"errors"
	"fmt"
	"reflect"
	"strings"

	"github.com/caarlos0/env/v11"
)

// Parse fills dst, a pointer to a struct with env tags, from environ (as
// os.Environ gives it). A value that cannot be parsed is a *VarError naming
// its variable; the value itself is never repeated: it may be a secret.
func Parse(dst any, environ []string) error {
	vars := make(map[string]string, len(environ))
	for _, kv := range environ {
		if k, v, ok := strings.Cut(kv, "="); ok {
			vars[k] = v
		}
	}
	err := env.ParseWithOptions(dst, env.Options{Environment: vars})
	if err == nil {
		return nil
	}
	var agg env.AggregateError
	if errors.As(err, &agg) && len(agg.Errors) > 0 {
		var pe env.ParseError
		if errors.As(agg.Errors[0], &pe) {
			name := pe.Name
			if f, ok := reflect.TypeOf(dst).Elem().FieldByName(pe.Name); ok {
				name = strings.Split(f.Tag.Get("env"), ",")[0]
			}
			return Bad(name, "cannot parse as %s", pe.Type)
		}
	}
	return fmt.Errorf("configuration: %w", err)
}
