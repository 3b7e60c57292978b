package batchstore

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"os"
)

// CreateFile stores f with content, read to its end in 1 MiB chunks, all in
// one transaction, and returns f with Bytes set. Content longer than maxBytes
// is ErrTooLarge, and nothing of it is kept. f.ID must be new.
//
// With SQLite, whose one writer connection every write waits for, content is
// first copied to a temporary file beside the database, so that a slow
// upload holds up no other write; the transaction then runs at disk speed.
func (s *Store) CreateFile(ctx context.Context, f File, content io.Reader, maxBytes int64) (File, error) {
	if _, onDisk := content.(*os.File); s.spoolDir != "" && !onDisk {
		spool, err := s.spool(content, maxBytes)
		if err != nil {
			return File{}, err
		}
		defer func() {
			spool.Close()
			os.Remove(spool.Name())
		}()
		content = spool
	}
	err := s.tx(ctx, "create file", func(tx *sql.Tx) error {
		n, err := s.writeChunks(ctx, tx, f.ID, content, maxBytes)
		if err != nil {
			return err
		}
		f.Bytes = n
		return s.insertFile(ctx, tx, f)
	})
	if err != nil {
		return File{}, err
	}
	return f, nil
}

// writeChunks reads content in chunkSize pieces and inserts them as file id's
// chunks, returning how many bytes there were.
// spool copies up to maxBytes of content to a new temporary file in
// s.spoolDir and returns it, positioned at its start; the caller closes and
// removes it. More than maxBytes is ErrTooLarge.
func (s *Store) spool(content io.Reader, maxBytes int64) (*os.File, error) {
	tmp, err := os.CreateTemp(s.spoolDir, ".batchstore-upload-*")
	if err != nil {
		return nil, fmt.Errorf("batchstore: create file: spool: %w", err)
	}
	n, err := io.Copy(tmp, io.LimitReader(content, maxBytes+1))
	if err == nil && n > maxBytes {
		err = ErrTooLarge
	}
	if err == nil {
		_, err = tmp.Seek(0, io.SeekStart)
	}
	if err != nil {
		tmp.Close()
		os.Remove(tmp.Name())
		if errors.Is(err, ErrTooLarge) {
			return nil, err
		}
		return nil, fmt.Errorf("batchstore: create file: spool: %w", err)
	}
	return tmp, nil
}

func (s *Store) writeChunks(ctx context.Context, tx *sql.Tx, id string, content io.Reader, maxBytes int64) (int64, error) {
	buf := make([]byte, chunkSize)
	var total int64
	for seq := 0; ; seq++ {
		n, err := io.ReadFull(content, buf)
		if n > 0 {
			total += int64(n)
			if total > maxBytes {
				return 0, ErrTooLarge
			}
			if _, err := tx.ExecContext(ctx, s.d.q(`INSERT INTO bs_chunks (file_id, seq, data) VALUES (?, ?, ?)`), id, seq, buf[:n]); err != nil {
				return 0, fmt.Errorf("insert chunk: %w", err)
			}
		}
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return total, nil
		}
		if err != nil {
			return 0, fmt.Errorf("read content: %w", err)
		}
	}
}

func (s *Store) insertFile(ctx context.Context, tx *sql.Tx, f File) error {
	_, err := tx.ExecContext(ctx, s.d.q(`INSERT INTO bs_files (id, owner, purpose, filename, bytes, created_at) VALUES (?, ?, ?, ?, ?, ?)`),
		f.ID, f.Owner, f.Purpose, f.Filename, f.Bytes, millis(f.CreatedAt))
	if err != nil {
		return fmt.Errorf("insert file: %w", err)
	}
	return nil
}

const fileColumns = `id, owner, purpose, filename, bytes, created_at`

type scanner interface{ Scan(...any) error }

func scanFile(row scanner) (File, error) {
	var f File
	var created int64
	err := row.Scan(&f.ID, &f.Owner, &f.Purpose, &f.Filename, &f.Bytes, &created)
	f.CreatedAt = fromMillis(created)
	return f, err
}

// File returns file id's metadata; ErrNotFound if there is none.
func (s *Store) File(ctx context.Context, id string) (File, error) {
	f, err := scanFile(s.r.QueryRowContext(ctx, s.d.q(`SELECT `+fileColumns+` FROM bs_files WHERE id = ?`), id))
	if errors.Is(err, sql.ErrNoRows) {
		return File{}, ErrNotFound
	}
	if err != nil {
		return File{}, fmt.Errorf("batchstore: file: %w", err)
	}
	return f, nil
}

// OpenFile returns file id's content; ErrNotFound if there is none. The
// reader fetches one chunk per query, under ctx, holding no cursor or
// transaction between reads; the caller closes it. A file deleted while it
// is read ends in io.ErrUnexpectedEOF.
func (s *Store) OpenFile(ctx context.Context, id string) (io.ReadCloser, error) {
	f, err := s.File(ctx, id)
	if err != nil {
		return nil, err
	}
	return &fileReader{ctx: ctx, s: s, id: id, left: f.Bytes}, nil
}

type fileReader struct {
	ctx  context.Context
	s    *Store
	id   string
	seq  int
	left int64  // bytes not yet read
	buf  []byte // the rest of the current chunk
	err  error
}

func (r *fileReader) Read(p []byte) (int, error) {
	if r.err != nil {
		return 0, r.err
	}
	for len(r.buf) == 0 {
		if r.left == 0 {
			r.err = io.EOF
			return 0, io.EOF
		}
		var data []byte
		err := r.s.r.QueryRowContext(r.ctx, r.s.d.q(`SELECT data FROM bs_chunks WHERE file_id = ? AND seq = ?`), r.id, r.seq).Scan(&data)
		if errors.Is(err, sql.ErrNoRows) {
			r.err = io.ErrUnexpectedEOF
			return 0, r.err
		}
		if err != nil {
			r.err = fmt.Errorf("batchstore: read file %s chunk %d: %w", r.id, r.seq, err)
			return 0, r.err
		}
		r.seq++
		r.buf = data
	}
	n := copy(p, r.buf)
	r.buf = r.buf[n:]
	r.left -= int64(n)
	return n, nil
}

func (r *fileReader) Close() error {
	r.buf, r.err = nil, errors.New("batchstore: read of closed file")
	return nil
}

// Files lists owner's files, newest first (created_at, then id, descending),
// or oldest first when asc. purpose "" lists every purpose. after, if not "",
// is the id of the file the list continues after (ErrNotFound if there is no
// such file). limit >= 1 is the most to return; more says whether more
// follow.
func (s *Store) Files(ctx context.Context, owner, purpose, after string, limit int, asc bool) ([]File, bool, error) {
	if limit < 1 {
		return nil, false, fmt.Errorf("batchstore: files: limit %d < 1", limit)
	}
	query := `SELECT ` + fileColumns + ` FROM bs_files WHERE owner = ?`
	args := []any{owner}
	if purpose != "" {
		query += ` AND purpose = ?`
		args = append(args, purpose)
	}
	if after != "" {
		f, err := s.File(ctx, after)
		if err != nil {
			return nil, false, err
		}
		cmp := "<"
		if asc {
			cmp = ">"
		}
		query += ` AND (created_at ` + cmp + ` ? OR (created_at = ? AND id ` + cmp + ` ?))`
		c := millis(f.CreatedAt)
		args = append(args, c, c, f.ID)
	}
	if asc {
		query += ` ORDER BY created_at, id`
	} else {
		query += ` ORDER BY created_at DESC, id DESC`
	}
	query += ` LIMIT ?`
	args = append(args, limit+1)
	rows, err := s.r.QueryContext(ctx, s.d.q(query), args...)
	if err != nil {
		return nil, false, fmt.Errorf("batchstore: files: %w", err)
	}
	defer rows.Close()
	var files []File
	for rows.Next() {
		f, err := scanFile(rows)
		if err != nil {
			return nil, false, fmt.Errorf("batchstore: files: %w", err)
		}
		files = append(files, f)
	}
	if err := rows.Err(); err != nil {
		return nil, false, fmt.Errorf("batchstore: files: %w", err)
	}
	if len(files) > limit {
		return files[:limit], true, nil
	}
	return files, false, nil
}

// DeleteFile deletes file id and its content; ErrNotFound if there is none.
func (s *Store) DeleteFile(ctx context.Context, id string) error {
	return s.tx(ctx, "delete file", func(tx *sql.Tx) error {
		res, err := tx.ExecContext(ctx, s.d.q(`DELETE FROM bs_files WHERE id = ?`), id)
		if err != nil {
			return err
		}
		if n, err := res.RowsAffected(); err != nil {
			return err
		} else if n == 0 {
			return ErrNotFound
		}
		_, err = tx.ExecContext(ctx, s.d.q(`DELETE FROM bs_chunks WHERE file_id = ?`), id)
		return err
	})
}
