package batchstore_test

import (
	"testing"

	"go.uber.org/goleak"
)

// A Store that is closed leaves no goroutine of database/sql or its drivers
// behind.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }
