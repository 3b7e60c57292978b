package main

import (
	"fmt"
	"io"
	"reflect"
	"strings"
	"text/tabwriter"

	"github.com/sous-run/sous/internal/secret"
)

// defaultsNotInTags are the defaults that are worked out at start rather
// than written in an envDefault tag.
var defaultsNotInTags = map[string]string{
	"SOUS_MODEL":                        "(required)",
	"SOUS_DEAD_LETTER_QUEUE":            "<SOUS_QUEUE>.dlq",
	"SOUS_MODELS_ALLOWED":               "SOUS_MODEL only",
	"SOUS_WORKER_ID":                    "the host name",
	"SOUS_GPU_DEVICES":                  "what NVIDIA_VISIBLE_DEVICES exposes",
	"SOUS_SERVICEBUS_DEAD_LETTER_QUEUE": "the queue's own $DeadLetterQueue",
	"OTEL_SERVICE_NAME":                 "sous-worker",
	"OTEL_TRACES_EXPORTER":              "otlp with an endpoint, else none",
	"OTEL_METRICS_EXPORTER":             "prometheus (+ otlp with an endpoint)",
	"OTEL_TRACES_SAMPLER":               "parentbased_always_on",
}

// isHelp reports whether args ask for the usage text.
func isHelp(args []string) bool {
	for _, a := range args {
		switch a {
		case "-h", "-help", "--help", "help":
			return true
		}
	}
	return false
}

// printUsage writes the short form of README.md's configuration table:
// every variable the worker reads, with its default, in Config's order.
func printUsage(w io.Writer) {
	fmt.Fprint(w, `usage: worker

The sous worker drains a request queue, runs the prompts in batches on a local
inference engine and publishes the results. It takes no arguments: it is
configured by these environment variables (default on the right; what each
does: README.md, "Configuration"). An invalid value stops it with exit code 2.

`)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	for _, v := range configVars() {
		def := v.def
		if def == "" {
			def = "–"
		}
		if v.secret {
			def += "  (secret)"
		}
		fmt.Fprintf(tw, "  %s\t%s\n", v.name, def)
	}
	_ = tw.Flush()
	fmt.Fprint(w, `
Example, with an Ollama on this machine:

  SOUS_MODEL=llama3.2 SOUS_LOG_FORMAT=text worker
`)
}

type configVar struct {
	name, def string
	secret    bool
}

// configVars lists Config's variables in field order, nested structs
// (Telemetry) included.
func configVars() []configVar {
	var out []configVar
	secretType := reflect.TypeFor[secret.Value]()
	var walk func(t reflect.Type)
	walk = func(t reflect.Type) {
		for i := range t.NumField() {
			f := t.Field(i)
			tag := f.Tag.Get("env")
			if tag == "" {
				if f.Type.Kind() == reflect.Struct {
					walk(f.Type)
				}
				continue
			}
			name := strings.Split(tag, ",")[0]
			def, ok := f.Tag.Lookup("envDefault")
			if d, special := defaultsNotInTags[name]; special {
				def = d
			} else if !ok {
				def = ""
			}
			out = append(out, configVar{name: name, def: def, secret: f.Type == secretType})
		}
	}
	walk(reflect.TypeFor[Config]())
	return out
}
