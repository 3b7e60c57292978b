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

func TestRunRefuses(t *testing.T) {
	t.Parallel()
	for _, args := range [][]string{{"-targets", "0"}, {"-targets", "x"}, {"-hours", "0"}, {"-format", "json"}, {"-max", "0"}} {
		if err := run(args, &bytes.Buffer{}); err == nil {
			t.Errorf("run(%q): no error", args)
		}
	}
}
