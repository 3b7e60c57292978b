// Package batchstore is the gateway's durable state for the OpenAI Batch
// API: uploaded files (kept in 1 MiB chunks, never whole in memory),
// batches, the lines of each batch (the requests still to publish) and the
// result of each line, until Finalize turns the results into the batch's
// output and error files. It survives a gateway restart and can be shared by
// several gateway replicas.
//
// One implementation runs over database/sql with two drivers, chosen by the
// URL given to Open:
//
//   - "sqlite:PATH": SQLite through the pure-Go modernc.org/sqlite. The
//     default, for a single gateway: no cgo, no server to run, one file on a
//     volume, and real transactions. The database is in WAL mode, so reads
//     never wait for a write; all writes go through one connection (and
//     BEGIN IMMEDIATE), so concurrent writers queue in Go instead of getting
//     SQLITE_BUSY back.
//   - "postgres://..." or "postgresql://...": PostgreSQL through pgx, for
//     several gateway replicas sharing one database. Every transaction that
//     changes a batch locks the batch's row first, so concurrent replicas
//     serialize per batch (and never deadlock on each other).
//
// Times are stored as Unix milliseconds; the zero time.Time is stored as 0
// and means "not reached". Times read back are in UTC.
//
// Concurrency: a *Store is safe for concurrent use by any number of
// goroutines, and several *Store (in one process or in several replicas) may
// share one PostgreSQL database. A SQLite file is meant for one gateway
// process: another process writing to it would meet SQLITE_BUSY once its busy
// timeout (10s) ran out. With SQLite a write waits for the one before it, so
// CreateFile first copies an upload to a temporary file beside the database
// (a slow client holds up nobody), and a Finalize holds up other writes for
// as long as it takes to write the batch's files.
//
// RecordResults, MarkPublished and Finalize are idempotent or guarded by the
// batch's status, so a result delivered twice, or to two replicas, is counted
// once. The io.ReadCloser that OpenFile returns must be closed by the caller
// and is not safe for concurrent use.
package batchstore
