// Package envcheck finds SOUS_* environment variables that no part of sous
// reads, such as a misspelled SOUS_ENGNE_URL, which would otherwise leave
// the program running silently on the default. It names the closest known
// variable so that the log line says what was meant.
//
// The known names are the env tags of a binary's Config (Tags) plus Names,
// every SOUS_* variable any sous binary or script reads: a worker and a
// gateway share one ConfigMap, and neither should warn about the other's
// variables. Names is generated from the sources (go test -run
// TestNamesUpToDate -update) and a test fails when it is stale.
//
// Everything here is a pure function of its arguments, safe for concurrent
// use; only cmd/* passes the environment in.
package envcheck
