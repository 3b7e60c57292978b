package soustest_test

import (
	"context"
	"flag"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/sous-run/sous/integration/containertest"
)

// TestMain builds the images ExampleRun runs (scripts/images.sh) where a
// Docker engine answers; where none does, it skips ExampleRun with one line
// saying why, except in CI (CI=true), where that fails the run.
func TestMain(m *testing.M) {
	flag.Parse()
	ctx, cancel := context.WithTimeout(context.Background(), 45*time.Minute)
	err := containertest.Init(ctx)
	cancel()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	if why := containertest.Unavailable(); why != "" {
		if os.Getenv("CI") == "true" {
			fmt.Fprintln(os.Stderr, "soustest: CI=true and", why)
			os.Exit(1)
		}
		fmt.Fprintln(os.Stderr, "soustest: skipping ExampleRun:", why)
		skip := "^ExampleRun$"
		if cur := flag.Lookup("test.skip").Value.String(); cur != "" {
			skip = cur + "|" + skip
		}
		if err := flag.Set("test.skip", skip); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	}
	os.Exit(m.Run())
}
