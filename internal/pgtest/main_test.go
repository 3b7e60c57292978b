package pgtest_test

import (
	"testing"

	"go.uber.org/goleak"
)

// A server that has been stopped leaves no goroutine waiting for it.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }
