package main

import (
	"bytes"
	"strings"
	"testing"
)

// Two hours of the day (the first bulk job included) print a table with
// a row per design.
func TestRun(t *testing.T) {
	t.Parallel()
	var b bytes.Buffer
	if err := run([]string{"-hours", "2", "-targets", "300"}, &b); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{"| design |", "(a) KEDA message count, value 96 per lane", "(b) sous scaler, targetDrainSeconds 300 |", "exact cost", "of 20000"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
}

// The traffic variants and the extra (a) rows of the second goal form.
func TestRunVariants(t *testing.T) {
	t.Parallel()
	var b bytes.Buffer
	if err := run([]string{"-hours", "2", "-targets", "300", "-bulk-scale", "0.5", "-deadline-scale", "0.5", "-keda-bulk-values", "4800", "-deadline-aware", "86400:1800"}, &b); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{"(a) KEDA message count, value 96 interactive, 4800 bulk", "(c) seconds of work, target 86400", "of 10000"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
}

func TestRunRefuses(t *testing.T) {
	t.Parallel()
	for _, args := range [][]string{{"-targets", "0"}, {"-targets", "x"}, {"-hours", "0"}, {"-format", "json"}, {"-max", "0"}, {"-deadline-scale", "0"}, {"-bulk-scale", "-1"}, {"-keda-bulk-values", "0"}} {
		if err := run(args, &bytes.Buffer{}); err == nil {
			t.Errorf("run(%q): no error", args)
		}
	}
}
