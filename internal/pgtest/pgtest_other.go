//go:build !linux

package pgtest

import "testing"

// Start skips t: pgtest runs the server binaries of Debian/Ubuntu's
// postgresql packages, on Linux.
func Start(t testing.TB) string {
	t.Helper()
	t.Skip("pgtest: needs Linux with the postgresql package's server binaries")
	return ""
}

// Database skips t; see Start.
func Database(t testing.TB, url string) string {
	t.Helper()
	t.Skip("pgtest: needs Linux")
	return ""
}
