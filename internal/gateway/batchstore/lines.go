package batchstore

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"
)

// linesPerInsert bounds the rows of one multi-row statement: five
// parameters a row stays far below both drivers' parameter limits.
const linesPerInsert = 500

// AddLines adds lines to batch id in one transaction. A custom_id already in
// the batch, or twice in lines, is a *DuplicateError, and then none of lines
// is kept; so is an Index already in the batch (a plain error). ErrNotFound
// if there is no such batch.
func (s *Store) AddLines(ctx context.Context, batchID string, lines []Line) error {
	seen := make(map[string]bool, len(lines))
	for _, l := range lines {
		if seen[l.CustomID] {
			return &DuplicateError{CustomID: l.CustomID}
		}
		seen[l.CustomID] = true
	}
	return s.tx(ctx, "add lines", func(tx *sql.Tx) error {
		if st, _, err := s.lockBatch(ctx, tx, batchID); err != nil {
			return err
		} else if st != Validating {
			return ErrNotValidating
		}
		for part := range slices.Chunk(lines, linesPerInsert) {
			// The batch's row lock keeps other AddLines out, so what this
			// finds stays true until the insert.
			args := []any{batchID}
			for _, l := range part {
				args = append(args, l.CustomID)
			}
			var dup string
			err := tx.QueryRowContext(ctx, s.d.q(`SELECT custom_id FROM bs_lines WHERE batch_id = ? AND custom_id IN (`+placeholders(len(part))+`) LIMIT 1`), args...).Scan(&dup)
			if err == nil {
				return &DuplicateError{CustomID: dup}
			}
			if !errors.Is(err, sql.ErrNoRows) {
				return err
			}
			args = args[:0]
			for _, l := range part {
				args = append(args, batchID, l.Index, l.CustomID, l.Request, 0)
			}
			values := strings.TrimSuffix(strings.Repeat("(?, ?, ?, ?, ?),", len(part)), ",")
			res, err := tx.ExecContext(ctx, s.d.q(`INSERT INTO bs_lines (batch_id, idx, custom_id, request, published) VALUES `+values+` ON CONFLICT DO NOTHING`), args...)
			if err != nil {
				return err
			}
			if n, err := res.RowsAffected(); err != nil {
				return err
			} else if n != int64(len(part)) {
				return fmt.Errorf("%d of %d lines have an index already in batch %s", int64(len(part))-n, len(part), batchID)
			}
		}
		return nil
	})
}

// DeleteLines removes every line of batch id, which must be validating
// (a validation cut short, its gateway died, starts again from an empty
// batch) or cancelling (cancelled while validating: nothing of it ran);
// else ErrNotValidating. ErrNotFound if there is no such batch.
func (s *Store) DeleteLines(ctx context.Context, batchID string) error {
	return s.tx(ctx, "delete lines", func(tx *sql.Tx) error {
		if st, _, err := s.lockBatch(ctx, tx, batchID); err != nil {
			return err
		} else if st != Validating && st != Cancelling {
			return ErrNotValidating
		}
		_, err := tx.ExecContext(ctx, s.d.q(`DELETE FROM bs_lines WHERE batch_id = ?`), batchID)
		return err
	})
}

// Unpublished returns up to n of batch id's lines not yet marked published
// and not yet answered (a line answered before it was marked, when its
// publisher died between the two, is not published again), in Index order.
func (s *Store) Unpublished(ctx context.Context, batchID string, n int) ([]Line, error) {
	rows, err := s.r.QueryContext(ctx, s.d.q(`SELECT idx, custom_id, request FROM bs_lines WHERE batch_id = ? AND published = 0
		AND NOT EXISTS (SELECT 1 FROM bs_results r WHERE r.batch_id = bs_lines.batch_id AND r.custom_id = bs_lines.custom_id)
		ORDER BY idx LIMIT ?`), batchID, n)
	if err != nil {
		return nil, fmt.Errorf("batchstore: unpublished: %w", err)
	}
	defer rows.Close()
	var lines []Line
	for rows.Next() {
		var l Line
		if err := rows.Scan(&l.Index, &l.CustomID, &l.Request); err != nil {
			return nil, fmt.Errorf("batchstore: unpublished: %w", err)
		}
		lines = append(lines, l)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("batchstore: unpublished: %w", err)
	}
	return lines, nil
}

// MarkPublished marks batch id's lines at indexes published. It is
// idempotent: the batch's Published grows by the lines not marked before.
// ErrNotFound if there is no such batch.
func (s *Store) MarkPublished(ctx context.Context, batchID string, indexes []int) error {
	return s.tx(ctx, "mark published", func(tx *sql.Tx) error {
		if _, _, err := s.lockBatch(ctx, tx, batchID); err != nil {
			return err
		}
		var marked int64
		for part := range slices.Chunk(indexes, linesPerInsert) {
			args := []any{batchID}
			for _, i := range part {
				args = append(args, i)
			}
			res, err := tx.ExecContext(ctx, s.d.q(`UPDATE bs_lines SET published = 1 WHERE batch_id = ? AND published = 0 AND idx IN (`+placeholders(len(part))+`)`), args...)
			if err != nil {
				return err
			}
			n, err := res.RowsAffected()
			if err != nil {
				return err
			}
			marked += n
		}
		if marked == 0 {
			return nil
		}
		_, err := tx.ExecContext(ctx, s.d.q(`UPDATE bs_batches SET published = published + ? WHERE id = ?`), marked, batchID)
		return err
	})
}

// recording are the statuses in which a batch takes results.
var recording = []Status{InProgress, Finalizing, Cancelling}

// RecordResults records rs in one transaction, idempotently by (BatchID,
// CustomID): a result already recorded, for a batch that does not exist
// or is not in_progress, finalizing or cancelling, or that names no line
// of its batch (by Index and CustomID), is ignored. Each new
// result adds one to its batch's Completed (OK) or Failed (!OK). It returns
// how many results were new.
func (s *Store) RecordResults(ctx context.Context, rs []Result) (int, error) {
	byBatch := make(map[string][]Result)
	for _, r := range rs {
		byBatch[r.BatchID] = append(byBatch[r.BatchID], r)
	}
	// Lock batches in one order, so that concurrent calls cannot deadlock.
	ids := make([]string, 0, len(byBatch))
	for id := range byBatch {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	var added int
	err := s.tx(ctx, "record results", func(tx *sql.Tx) error {
		added = 0
		for _, id := range ids {
			st, _, err := s.lockBatch(ctx, tx, id)
			if errors.Is(err, ErrNotFound) || err == nil && !slices.Contains(recording, st) {
				continue
			}
			if err != nil {
				return err
			}
			var ok, failed int
			for _, r := range byBatch[id] {
				// Only a result for one of the batch's own lines, by index and
				// custom_id both: a result naming no line would count twice.
				var one int
				err := tx.QueryRowContext(ctx, s.d.q(`SELECT 1 FROM bs_lines WHERE batch_id = ? AND idx = ? AND custom_id = ?`), r.BatchID, r.Index, r.CustomID).Scan(&one)
				if errors.Is(err, sql.ErrNoRows) {
					continue
				}
				if err != nil {
					return err
				}
				res, err := tx.ExecContext(ctx, s.d.q(`INSERT INTO bs_results (batch_id, custom_id, idx, ok, line) VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING`),
					r.BatchID, r.CustomID, r.Index, boolInt(r.OK), r.Line)
				if err != nil {
					return err
				}
				n, err := res.RowsAffected()
				if err != nil {
					return err
				}
				if n == 0 {
					continue
				}
				if r.OK {
					ok++
				} else {
					failed++
				}
			}
			if ok+failed == 0 {
				continue
			}
			if _, err := tx.ExecContext(ctx, s.d.q(`UPDATE bs_batches SET completed = completed + ?, failed = failed + ? WHERE id = ?`), ok, failed, id); err != nil {
				return err
			}
			added += ok + failed
		}
		return nil
	})
	if err != nil {
		return 0, err
	}
	return added, nil
}

// finalizePage is how many result or line rows Finalize reads at a time.
const finalizePage = 256

// Finalize ends batch id, which must be in one of from, in status to
// (completed, expired, cancelled or failed), in one transaction. It writes
// the output file outputID (purpose "batch_output", the batch's owner) with
// the OK results' lines in Index order, each followed by '\n', and the error
// file errorID with the failed results' lines and, for each line without a
// result, the line unfinished(customID) returns (counted in Failed), all in
// Index order. A file with no lines is not created and its id not set on
// the batch. It then deletes the batch's lines and results. It returns false
// if the batch's status was not in from, ErrNotFound if there is no such
// batch. unfinished may be nil only if every line has a result.
func (s *Store) Finalize(ctx context.Context, id string, from []Status, to Status, outputID, errorID string, unfinished func(customID string) []byte, at time.Time) (bool, error) {
	var done bool
	err := s.tx(ctx, "finalize", func(tx *sql.Tx) error {
		ok, owner, err := s.transition(ctx, tx, id, from, to, at, "")
		if err != nil || !ok {
			return err
		}
		name := id
		if !strings.HasPrefix(name, "batch_") {
			name = "batch_" + name
		}
		out := &chunkWriter{ctx: ctx, tx: tx, s: s, file: File{ID: outputID, Owner: owner, Purpose: "batch_output", Filename: name + "_output.jsonl", CreatedAt: at}}
		errw := &chunkWriter{ctx: ctx, tx: tx, s: s, file: File{ID: errorID, Owner: owner, Purpose: "batch_output", Filename: name + "_error.jsonl", CreatedAt: at}}
		pending, err := s.writeFiles(ctx, tx, id, out, errw, unfinished)
		if err != nil {
			return err
		}
		var outID, errID string
		if out.lines > 0 {
			if err := out.close(); err != nil {
				return err
			}
			outID = outputID
		}
		if errw.lines > 0 {
			if err := errw.close(); err != nil {
				return err
			}
			errID = errorID
		}
		if _, err := tx.ExecContext(ctx, s.d.q(`UPDATE bs_batches SET output_file_id = ?, error_file_id = ?, failed = failed + ? WHERE id = ?`), outID, errID, pending, id); err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, s.d.q(`DELETE FROM bs_lines WHERE batch_id = ?`), id); err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, s.d.q(`DELETE FROM bs_results WHERE batch_id = ?`), id); err != nil {
			return err
		}
		done = true
		return nil
	})
	return done, err
}

// writeFiles writes batch id's lines in Index order, a page at a time (each
// page read whole before it is written, as a transaction's connection runs
// one statement at a time), in one pass: an OK result's line to out, a
// failed result's to errw, and for a line without a result the line
// unfinished renders to errw; it returns how many had no result.
func (s *Store) writeFiles(ctx context.Context, tx *sql.Tx, id string, out, errw *chunkWriter, unfinished func(string) []byte) (int, error) {
	type row struct {
		idx  int
		cid  string
		ok   sql.NullInt64
		line []byte
	}
	var pending int
	last := -1
	for {
		rows, err := tx.QueryContext(ctx, s.d.q(`SELECT l.idx, l.custom_id, r.ok, r.line FROM bs_lines l
			LEFT JOIN bs_results r ON r.batch_id = l.batch_id AND r.custom_id = l.custom_id
			WHERE l.batch_id = ? AND l.idx > ? ORDER BY l.idx LIMIT ?`), id, last, finalizePage)
		if err != nil {
			return 0, err
		}
		var page []row
		for rows.Next() {
			var r row
			if err := rows.Scan(&r.idx, &r.cid, &r.ok, &r.line); err != nil {
				rows.Close()
				return 0, err
			}
			page = append(page, r)
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return 0, err
		}
		for _, r := range page {
			var err error
			switch {
			case r.ok.Valid && r.ok.Int64 == 1:
				err = out.writeLine(r.line)
			case r.ok.Valid:
				err = errw.writeLine(r.line)
			case unfinished == nil:
				err = fmt.Errorf("line %d (%s) has no result and no unfinished renderer", r.idx, r.cid)
			default:
				pending++
				err = errw.writeLine(unfinished(r.cid))
			}
			if err != nil {
				return 0, err
			}
		}
		if len(page) < finalizePage {
			return pending, nil
		}
		last = page[len(page)-1].idx
	}
}

// chunkWriter writes a file's content as chunks inside a transaction, and
// its row on close.
type chunkWriter struct {
	ctx   context.Context
	tx    *sql.Tx
	s     *Store
	file  File
	buf   []byte
	seq   int
	lines int
}

// writeLine writes line and a '\n', flushing every full chunk.
func (w *chunkWriter) writeLine(line []byte) error {
	w.lines++
	w.buf = append(w.buf, line...)
	w.buf = append(w.buf, '\n')
	for len(w.buf) >= chunkSize {
		if err := w.flush(w.buf[:chunkSize]); err != nil {
			return err
		}
		w.buf = w.buf[:copy(w.buf, w.buf[chunkSize:])]
	}
	return nil
}

func (w *chunkWriter) flush(data []byte) error {
	if _, err := w.tx.ExecContext(w.ctx, w.s.d.q(`INSERT INTO bs_chunks (file_id, seq, data) VALUES (?, ?, ?)`), w.file.ID, w.seq, data); err != nil {
		return fmt.Errorf("insert chunk: %w", err)
	}
	w.seq++
	w.file.Bytes += int64(len(data))
	return nil
}

// close writes the last chunk and the file's row.
func (w *chunkWriter) close() error {
	if len(w.buf) > 0 {
		if err := w.flush(w.buf); err != nil {
			return err
		}
		w.buf = nil
	}
	return w.s.insertFile(w.ctx, w.tx, w.file)
}
