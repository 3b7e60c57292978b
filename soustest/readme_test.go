package soustest_test

import (
	"os"
	"strings"
	"testing"
)

// TestREADMEShowsTheExample: the README's soustest example is ExampleRun,
// word for word, so the code users copy is the code CI runs.
func TestREADMEShowsTheExample(t *testing.T) {
	t.Parallel()
	src, err := os.ReadFile("example_test.go")
	if err != nil {
		t.Fatal(err)
	}
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	s := string(src)
	start := strings.Index(s, "func ExampleRun() {")
	end := strings.Index(s[start:], "\n}\n")
	if start < 0 || end < 0 {
		t.Fatal("no ExampleRun in example_test.go")
	}
	body := s[start : start+end+2]
	if !strings.Contains(string(readme), body) {
		t.Fatalf("README.md does not show ExampleRun as example_test.go has it:\n%s", body)
	}
}
