package batchstore

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"
)

const batchColumns = `id, owner, endpoint, input_file_id, completion_window, queue, status, metadata, errors,
	output_file_id, error_file_id, created_at, expires_at, in_progress_at, finalizing_at, completed_at,
	failed_at, expired_at, cancelling_at, cancelled_at, total, completed, failed, published`

// CreateBatch stores b, whose ID must be new.
func (s *Store) CreateBatch(ctx context.Context, b Batch) error {
	meta, err := json.Marshal(b.Metadata)
	if err != nil {
		return fmt.Errorf("batchstore: create batch: metadata: %w", err)
	}
	errs, err := json.Marshal(b.Errors)
	if err != nil {
		return fmt.Errorf("batchstore: create batch: errors: %w", err)
	}
	_, err = s.w.ExecContext(ctx, s.d.q(`INSERT INTO bs_batches (`+batchColumns+`) VALUES (`+placeholders(24)+`)`),
		b.ID, b.Owner, b.Endpoint, b.InputFileID, b.CompletionWindow, b.Queue, string(b.Status), string(meta), string(errs),
		b.OutputFileID, b.ErrorFileID, millis(b.CreatedAt), millis(b.ExpiresAt), millis(b.InProgressAt), millis(b.FinalizingAt),
		millis(b.CompletedAt), millis(b.FailedAt), millis(b.ExpiredAt), millis(b.CancellingAt), millis(b.CancelledAt),
		b.Total, b.Completed, b.Failed, b.Published)
	if err != nil {
		return fmt.Errorf("batchstore: create batch: %w", err)
	}
	return nil
}

func scanBatch(row scanner) (Batch, error) {
	var b Batch
	var st, meta, errs string
	var at [9]int64
	err := row.Scan(&b.ID, &b.Owner, &b.Endpoint, &b.InputFileID, &b.CompletionWindow, &b.Queue, &st, &meta, &errs,
		&b.OutputFileID, &b.ErrorFileID, &at[0], &at[1], &at[2], &at[3], &at[4], &at[5], &at[6], &at[7], &at[8],
		&b.Total, &b.Completed, &b.Failed, &b.Published)
	if err != nil {
		return Batch{}, err
	}
	b.Status = Status(st)
	if err := json.Unmarshal([]byte(meta), &b.Metadata); err != nil {
		return Batch{}, fmt.Errorf("batch %s metadata: %w", b.ID, err)
	}
	if err := json.Unmarshal([]byte(errs), &b.Errors); err != nil {
		return Batch{}, fmt.Errorf("batch %s errors: %w", b.ID, err)
	}
	for i, t := range []*time.Time{&b.CreatedAt, &b.ExpiresAt, &b.InProgressAt, &b.FinalizingAt, &b.CompletedAt,
		&b.FailedAt, &b.ExpiredAt, &b.CancellingAt, &b.CancelledAt} {
		*t = fromMillis(at[i])
	}
	return b, nil
}

// Batch returns batch id; ErrNotFound if there is none.
func (s *Store) Batch(ctx context.Context, id string) (Batch, error) {
	b, err := scanBatch(s.r.QueryRowContext(ctx, s.d.q(`SELECT `+batchColumns+` FROM bs_batches WHERE id = ?`), id))
	if errors.Is(err, sql.ErrNoRows) {
		return Batch{}, ErrNotFound
	}
	if err != nil {
		return Batch{}, fmt.Errorf("batchstore: batch: %w", err)
	}
	return b, nil
}

// Batches lists owner's batches newest first (created_at, then id,
// descending). after, if not "", is the id of the batch the list continues
// after (ErrNotFound if there is no such batch). limit >= 1 is the most to
// return; the bool says whether more follow.
func (s *Store) Batches(ctx context.Context, owner, after string, limit int) ([]Batch, bool, error) {
	if limit < 1 {
		return nil, false, fmt.Errorf("batchstore: batches: limit %d < 1", limit)
	}
	query := `SELECT ` + batchColumns + ` FROM bs_batches WHERE owner = ?`
	args := []any{owner}
	if after != "" {
		b, err := s.Batch(ctx, after)
		if err != nil {
			return nil, false, err
		}
		c := millis(b.CreatedAt)
		query += ` AND (created_at < ? OR (created_at = ? AND id < ?))`
		args = append(args, c, c, b.ID)
	}
	query += ` ORDER BY created_at DESC, id DESC LIMIT ?`
	args = append(args, limit+1)
	bs, err := s.queryBatches(ctx, query, args...)
	if err != nil {
		return nil, false, fmt.Errorf("batchstore: batches: %w", err)
	}
	if len(bs) > limit {
		return bs[:limit], true, nil
	}
	return bs, false, nil
}

// Active returns every batch still to be worked on (validating, in_progress,
// finalizing or cancelling), oldest first.
func (s *Store) Active(ctx context.Context) ([]Batch, error) {
	bs, err := s.queryBatches(ctx, `SELECT `+batchColumns+` FROM bs_batches WHERE status IN (?, ?, ?, ?) ORDER BY created_at, id`,
		string(Validating), string(InProgress), string(Finalizing), string(Cancelling))
	if err != nil {
		return nil, fmt.Errorf("batchstore: active: %w", err)
	}
	return bs, nil
}

func (s *Store) queryBatches(ctx context.Context, query string, args ...any) ([]Batch, error) {
	rows, err := s.r.QueryContext(ctx, s.d.q(query), args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var bs []Batch
	for rows.Next() {
		b, err := scanBatch(rows)
		if err != nil {
			return nil, err
		}
		bs = append(bs, b)
	}
	return bs, rows.Err()
}

// CountByStatus returns how many batches are in each status; a status with
// none is absent.
func (s *Store) CountByStatus(ctx context.Context) (map[Status]int, error) {
	rows, err := s.r.QueryContext(ctx, `SELECT status, COUNT(*) FROM bs_batches GROUP BY status`)
	if err != nil {
		return nil, fmt.Errorf("batchstore: count by status: %w", err)
	}
	defer rows.Close()
	counts := make(map[Status]int)
	for rows.Next() {
		var st string
		var n int
		if err := rows.Scan(&st, &n); err != nil {
			return nil, fmt.Errorf("batchstore: count by status: %w", err)
		}
		counts[Status(st)] = n
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("batchstore: count by status: %w", err)
	}
	return counts, nil
}

// Transition moves batch id from one of the statuses from to status to,
// setting to's *_at time to at. It returns false (and no error) if the
// batch's status was not in from, ErrNotFound if there is no such batch.
func (s *Store) Transition(ctx context.Context, id string, from []Status, to Status, at time.Time) (bool, error) {
	var ok bool
	err := s.tx(ctx, "transition", func(tx *sql.Tx) error {
		var err error
		ok, _, err = s.transition(ctx, tx, id, from, to, at, "")
		return err
	})
	return ok, err
}

// transition is Transition inside tx, also setting the extra assignments
// set (", col = ?" pieces, with their args) and returning the batch's owner.
func (s *Store) transition(ctx context.Context, tx *sql.Tx, id string, from []Status, to Status, at time.Time, set string, setArgs ...any) (bool, string, error) {
	col, err := atColumn(to)
	if err != nil {
		return false, "", err
	}
	st, owner, err := s.lockBatch(ctx, tx, id)
	if err != nil {
		return false, "", err
	}
	if !slices.Contains(from, st) {
		return false, owner, nil
	}
	args := append([]any{string(to), millis(at)}, setArgs...)
	args = append(args, id)
	if _, err := tx.ExecContext(ctx, s.d.q(`UPDATE bs_batches SET status = ?, `+col+` = ?`+set+` WHERE id = ?`), args...); err != nil {
		return false, "", err
	}
	return true, owner, nil
}

// Start moves batch id from validating to in_progress, with total lines; see
// Transition.
func (s *Store) Start(ctx context.Context, id string, total int, at time.Time) (bool, error) {
	var ok bool
	err := s.tx(ctx, "start", func(tx *sql.Tx) error {
		var err error
		// The lines must be the validation's whole work: two validations
		// of one batch (a leader that lost its lease and the next) cannot
		// both start it with lines added twice or missing.
		if st, _, err := s.lockBatch(ctx, tx, id); err != nil || st != Validating {
			return err // not validating: ok stays false
		}
		var n int
		if err := tx.QueryRowContext(ctx, s.d.q(`SELECT COUNT(*) FROM bs_lines WHERE batch_id = ?`), id).Scan(&n); err != nil {
			return err
		}
		if n != total {
			return fmt.Errorf("%w: it holds %d lines, not %d", ErrNotValidating, n, total)
		}
		ok, _, err = s.transition(ctx, tx, id, []Status{Validating}, InProgress, at, `, total = ?`, total)
		return err
	})
	return ok, err
}

// Fail moves batch id from validating to failed, keeping errs as its errors
// and deleting its lines; see Transition.
func (s *Store) Fail(ctx context.Context, id string, errs []LineError, at time.Time) (bool, error) {
	js, err := json.Marshal(errs)
	if err != nil {
		return false, fmt.Errorf("batchstore: fail: %w", err)
	}
	var ok bool
	err = s.tx(ctx, "fail", func(tx *sql.Tx) error {
		var err error
		ok, _, err = s.transition(ctx, tx, id, []Status{Validating}, Failed, at, `, errors = ?`, string(js))
		if err != nil || !ok {
			return err
		}
		_, err = tx.ExecContext(ctx, s.d.q(`DELETE FROM bs_lines WHERE batch_id = ?`), id)
		return err
	})
	return ok, err
}

// Known returns which of ids are batches of this store.
func (s *Store) Known(ctx context.Context, ids []string) (map[string]bool, error) {
	out := make(map[string]bool, len(ids))
	if len(ids) == 0 {
		return out, nil
	}
	args := make([]any, len(ids))
	for i, id := range ids {
		args[i] = id
	}
	rows, err := s.r.QueryContext(ctx, s.d.q(`SELECT id FROM bs_batches WHERE id IN (`+placeholders(len(ids))+`)`), args...)
	if err != nil {
		return nil, fmt.Errorf("batchstore: known: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var id string
		if err := rows.Scan(&id); err != nil {
			return nil, fmt.Errorf("batchstore: known: %w", err)
		}
		out[id] = true
	}
	return out, rows.Err()
}
