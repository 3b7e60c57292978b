// Package pgtest starts private PostgreSQL servers for tests, from the
// Debian/Ubuntu server binaries (/usr/lib/postgresql/VERSION/bin). Each
// server lives in its own temporary directory, listens only on a free
// 127.0.0.1 port (never a system server's 5432) and on a Unix socket in that
// directory, runs with fsync off, and is stopped when the test ends, passed
// or failed. Without the binaries a test is skipped, or fails when the CI
// environment variable is set, naming what to install.
//
// Concurrency: Start and Database may be called from parallel tests; each
// Start starts its own server.
package pgtest
