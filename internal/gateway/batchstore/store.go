package batchstore

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib" // database/sql driver "pgx"
	_ "modernc.org/sqlite"             // database/sql driver "sqlite"
)

// ErrNotFound: no file or batch has that id.
var ErrNotFound = errors.New("batchstore: not found")

// ErrTooLarge: CreateFile's content was longer than its maxBytes.
var ErrTooLarge = errors.New("batchstore: file too large")

// ErrNotValidating: lines were added to, or removed from, a batch that is
// no longer validating (its validation was overtaken: cancelled, or
// finished by another).
var ErrNotValidating = errors.New("batchstore: the batch is not validating")

// DuplicateError is AddLines' error for a custom_id already in the batch (or
// twice in the lines given).
type DuplicateError struct{ CustomID string }

func (e *DuplicateError) Error() string {
	return fmt.Sprintf("batchstore: duplicate custom_id %q", e.CustomID)
}

// Status is a batch's status, as the Batch API names it.
type Status string

const (
	Validating Status = "validating"
	Failed     Status = "failed"
	InProgress Status = "in_progress"
	Finalizing Status = "finalizing"
	Completed  Status = "completed"
	Expired    Status = "expired"
	Cancelling Status = "cancelling"
	Cancelled  Status = "cancelled"
)

// atColumn is the column that records when a batch reached status s.
func atColumn(s Status) (string, error) {
	switch s {
	case Failed, InProgress, Finalizing, Completed, Expired, Cancelling, Cancelled:
		return string(s) + "_at", nil
	}
	return "", fmt.Errorf("batchstore: no transition to status %q", s)
}

// File is an uploaded file's metadata.
type File struct {
	ID, Owner, Purpose, Filename string // Owner: the API key's name ("" without keys)
	Bytes                        int64
	CreatedAt                    time.Time
}

// LineError is one of a batch's validation errors.
type LineError struct {
	Code, Message, Param string
	Line                 int // 1-based; 0 = none
}

// Batch is a batch as the Batch API shows it, plus where its lines go.
type Batch struct {
	ID, Owner, Endpoint, InputFileID, CompletionWindow string
	Queue                                              string // the request queue its lines go to
	Status                                             Status
	Metadata                                           map[string]string
	Errors                                             []LineError
	OutputFileID, ErrorFileID                          string // "" = none
	CreatedAt, ExpiresAt                               time.Time
	// Zero = not reached.
	InProgressAt, FinalizingAt, CompletedAt, FailedAt, ExpiredAt, CancellingAt, CancelledAt time.Time
	Total, Completed, Failed                                                                int // request_counts
	Published                                                                               int // lines handed to the broker so far
}

// Line is one request of a batch.
type Line struct {
	Index    int    // 0-based line position in the input file
	CustomID string // unique within the batch
	Request  []byte // the JSON to publish
}

// Result is the outcome of one line.
type Result struct {
	BatchID  string
	Index    int
	CustomID string
	OK       bool   // goes to the output file, else to the error file
	Line     []byte // the output or error file's line: JSON, no newline
}

// chunkSize is the size of every chunk of a file but its last.
const chunkSize = 1 << 20

// Store keeps files, batches, lines and results in SQLite or PostgreSQL. It
// is safe for concurrent use.
type Store struct {
	w  *sql.DB // writes (and reads inside write transactions)
	r  *sql.DB // reads outside transactions; == w for PostgreSQL
	d  dialect
	pg bool
	// spoolDir is where CreateFile copies an upload before its transaction
	// (SQLite: the database's directory); "" = no copy.
	spoolDir string
}

// dialect holds what differs between SQLite and PostgreSQL.
type dialect struct {
	name      string // "sqlite" or "postgres"
	blob      string // the binary column type
	forUpdate string // the row lock a write transaction takes on its batch
	dollar    bool   // placeholders are $1, $2... instead of ?
}

var (
	sqliteDialect   = dialect{name: "sqlite", blob: "BLOB"}
	postgresDialect = dialect{name: "postgres", blob: "BYTEA", forUpdate: " FOR UPDATE", dollar: true}
)

// q rewrites the ? placeholders of query for d. Queries here hold no ?
// inside string literals.
func (d dialect) q(query string) string {
	if !d.dollar {
		return query
	}
	var b strings.Builder
	n := 0
	for i := 0; i < len(query); i++ {
		if query[i] == '?' {
			n++
			b.WriteByte('$')
			b.WriteString(strconv.Itoa(n))
			continue
		}
		b.WriteByte(query[i])
	}
	return b.String()
}

// placeholders returns "?,?,...,?" (n of them).
func placeholders(n int) string {
	return strings.TrimSuffix(strings.Repeat("?,", n), ",")
}

// Open opens (creating it if need be) the store that url names:
// "postgres://..." or "postgresql://..." for PostgreSQL, "sqlite:PATH" for a
// SQLite file at PATH (relative to the working directory unless absolute).
// It creates the schema if missing; several replicas may Open one PostgreSQL
// database at once.
func Open(ctx context.Context, url string) (*Store, error) {
	switch {
	case strings.HasPrefix(url, "postgres://"), strings.HasPrefix(url, "postgresql://"):
		return openPostgres(ctx, url)
	case strings.HasPrefix(url, "sqlite:"):
		return openSQLite(ctx, strings.TrimPrefix(url, "sqlite:"))
	}
	return nil, fmt.Errorf("batchstore: unsupported store URL %q: want sqlite:PATH (a SQLite file) or postgres://USER:PASSWORD@HOST:PORT/DB (or postgresql://...)", redact(url))
}

// redact hides what could be a password in an unrecognized URL.
func redact(url string) string {
	if i := strings.Index(url, "@"); i >= 0 {
		return "...@" + url[i+1:]
	}
	return url
}

// pgMaxConns is how many connections one Store opens to PostgreSQL at most.
const pgMaxConns = 10

func openPostgres(ctx context.Context, url string) (*Store, error) {
	db, err := sql.Open("pgx", url)
	if err != nil {
		return nil, fmt.Errorf("batchstore: open postgres: %w", err)
	}
	// Bounded, so that replicas together stay within the server's
	// max_connections (100 by default).
	db.SetMaxOpenConns(pgMaxConns)
	db.SetMaxIdleConns(pgMaxConns)
	s := &Store{w: db, r: db, d: postgresDialect, pg: true}
	if err := s.migrate(ctx); err != nil {
		db.Close()
		return nil, err
	}
	return s, nil
}

func openSQLite(ctx context.Context, path string) (*Store, error) {
	if path == "" || strings.ContainsAny(path, "?#") {
		return nil, fmt.Errorf("batchstore: sqlite:PATH wants a file path without ? or #, got %q", path)
	}
	// The writer connection sets WAL (a property of the file) before any
	// reader opens; busy_timeout covers the short waits WAL still has (a
	// checkpoint, another process).
	base := filepath.Clean(path) + "?_pragma=busy_timeout(10000)&_pragma=foreign_keys(1)"
	w, err := sql.Open("sqlite", base+"&_pragma=journal_mode(WAL)&_pragma=synchronous(NORMAL)&_txlock=immediate")
	if err != nil {
		return nil, fmt.Errorf("batchstore: open sqlite: %w", err)
	}
	// One writer connection: writers wait for it in database/sql's pool (with
	// their ctx) rather than meet SQLITE_BUSY.
	w.SetMaxOpenConns(1)
	w.SetMaxIdleConns(1)
	w.SetConnMaxLifetime(0)
	w.SetConnMaxIdleTime(0)
	s := &Store{w: w, d: sqliteDialect, spoolDir: filepath.Dir(filepath.Clean(path))}
	if err := s.migrate(ctx); err != nil {
		w.Close()
		return nil, err
	}
	r, err := sql.Open("sqlite", base+"&_pragma=query_only(1)")
	if err != nil {
		w.Close()
		return nil, fmt.Errorf("batchstore: open sqlite: %w", err)
	}
	r.SetMaxOpenConns(4)
	s.r = r
	return s, nil
}

// Close closes the store's connections.
func (s *Store) Close() error {
	err := s.w.Close()
	if s.r != s.w {
		err = errors.Join(err, s.r.Close())
	}
	return err
}

// Driver returns "sqlite" or "postgres".
func (s *Store) Driver() string { return s.d.name }

// migrateLock is the PostgreSQL advisory lock key that serializes schema
// creation between replicas opening at once.
const migrateLock = 0x736f7573_62730001

func (s *Store) migrate(ctx context.Context) error {
	stmts := []string{
		`CREATE TABLE IF NOT EXISTS bs_files (
			id TEXT PRIMARY KEY,
			owner TEXT NOT NULL,
			purpose TEXT NOT NULL,
			filename TEXT NOT NULL,
			bytes BIGINT NOT NULL,
			created_at BIGINT NOT NULL)`,
		`CREATE INDEX IF NOT EXISTS bs_files_owner ON bs_files (owner, created_at, id)`,
		`CREATE TABLE IF NOT EXISTS bs_chunks (
			file_id TEXT NOT NULL,
			seq INTEGER NOT NULL,
			data ` + s.d.blob + ` NOT NULL,
			PRIMARY KEY (file_id, seq))`,
		`CREATE TABLE IF NOT EXISTS bs_batches (
			id TEXT PRIMARY KEY,
			owner TEXT NOT NULL,
			endpoint TEXT NOT NULL,
			input_file_id TEXT NOT NULL,
			completion_window TEXT NOT NULL,
			queue TEXT NOT NULL,
			status TEXT NOT NULL,
			metadata TEXT NOT NULL,
			errors TEXT NOT NULL,
			output_file_id TEXT NOT NULL,
			error_file_id TEXT NOT NULL,
			created_at BIGINT NOT NULL,
			expires_at BIGINT NOT NULL,
			in_progress_at BIGINT NOT NULL,
			finalizing_at BIGINT NOT NULL,
			completed_at BIGINT NOT NULL,
			failed_at BIGINT NOT NULL,
			expired_at BIGINT NOT NULL,
			cancelling_at BIGINT NOT NULL,
			cancelled_at BIGINT NOT NULL,
			total INTEGER NOT NULL,
			completed INTEGER NOT NULL,
			failed INTEGER NOT NULL,
			published INTEGER NOT NULL)`,
		`CREATE INDEX IF NOT EXISTS bs_batches_owner ON bs_batches (owner, created_at, id)`,
		`CREATE INDEX IF NOT EXISTS bs_batches_status ON bs_batches (status, created_at, id)`,
		`CREATE TABLE IF NOT EXISTS bs_lines (
			batch_id TEXT NOT NULL,
			idx INTEGER NOT NULL,
			custom_id TEXT NOT NULL,
			request ` + s.d.blob + ` NOT NULL,
			published INTEGER NOT NULL,
			PRIMARY KEY (batch_id, idx),
			UNIQUE (batch_id, custom_id))`,
		`CREATE INDEX IF NOT EXISTS bs_lines_unpublished ON bs_lines (batch_id, published, idx)`,
		`CREATE TABLE IF NOT EXISTS bs_results (
			batch_id TEXT NOT NULL,
			custom_id TEXT NOT NULL,
			idx INTEGER NOT NULL,
			ok INTEGER NOT NULL,
			line ` + s.d.blob + ` NOT NULL,
			PRIMARY KEY (batch_id, custom_id))`,
		`CREATE INDEX IF NOT EXISTS bs_results_order ON bs_results (batch_id, ok, idx, custom_id)`,
		`CREATE TABLE IF NOT EXISTS bs_leases (
			name TEXT PRIMARY KEY,
			holder TEXT NOT NULL,
			expires_at BIGINT NOT NULL)`,
	}
	return s.tx(ctx, "migrate", func(tx *sql.Tx) error {
		if s.pg {
			if _, err := tx.ExecContext(ctx, `SELECT pg_advisory_xact_lock($1)`, int64(migrateLock)); err != nil {
				return err
			}
		}
		for _, st := range stmts {
			if _, err := tx.ExecContext(ctx, st); err != nil {
				return err
			}
		}
		return nil
	})
}

// tx runs fn in a write transaction, committing if fn returns nil.
func (s *Store) tx(ctx context.Context, op string, fn func(*sql.Tx) error) error {
	tx, err := s.w.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("batchstore: %s: begin: %w", op, err)
	}
	if err := fn(tx); err != nil {
		tx.Rollback()
		var dup *DuplicateError
		if errors.Is(err, ErrNotFound) || errors.Is(err, ErrTooLarge) || errors.Is(err, ErrNotValidating) || errors.As(err, &dup) {
			return err
		}
		return fmt.Errorf("batchstore: %s: %w", op, err)
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("batchstore: %s: commit: %w", op, err)
	}
	return nil
}

// lockBatch takes the row lock on batch id (PostgreSQL; SQLite's single
// writer needs none) that every write transaction on a batch takes first,
// and returns its status and owner; ErrNotFound if there is no such batch.
func (s *Store) lockBatch(ctx context.Context, tx *sql.Tx, id string) (Status, string, error) {
	var st, owner string
	err := tx.QueryRowContext(ctx, s.d.q(`SELECT status, owner FROM bs_batches WHERE id = ?`+s.d.forUpdate), id).Scan(&st, &owner)
	if errors.Is(err, sql.ErrNoRows) {
		return "", "", ErrNotFound
	}
	return Status(st), owner, err
}

func millis(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixMilli()
}

func fromMillis(ms int64) time.Time {
	if ms == 0 {
		return time.Time{}
	}
	return time.UnixMilli(ms).UTC()
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}
