package gateway

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/sous-run/sous/internal/gateway/batchstore"
)

// fileObject is OpenAI's File object.
type fileObject struct {
	ID            string  `json:"id"`
	Object        string  `json:"object"`
	Bytes         int64   `json:"bytes"`
	CreatedAt     int64   `json:"created_at"`
	ExpiresAt     *int64  `json:"expires_at"`
	Filename      string  `json:"filename"`
	Purpose       string  `json:"purpose"`
	Status        string  `json:"status"`
	StatusDetails *string `json:"status_details"`
}

func toFileObject(f batchstore.File) fileObject {
	return fileObject{ID: f.ID, Object: "file", Bytes: f.Bytes, CreatedAt: f.CreatedAt.Unix(), Filename: f.Filename,
		Purpose: f.Purpose, Status: "processed"}
}

type listObject[T any] struct {
	Object  string  `json:"object"`
	Data    []T     `json:"data"`
	FirstID *string `json:"first_id"`
	LastID  *string `json:"last_id"`
	HasMore bool    `json:"has_more"`
}

func newList[T any](data []T, id func(T) string, more bool) listObject[T] {
	l := listObject[T]{Object: "list", Data: data, HasMore: more}
	if l.Data == nil {
		l.Data = []T{}
	}
	if len(data) > 0 {
		first, last := id(data[0]), id(data[len(data)-1])
		l.FirstID, l.LastID = &first, &last
	}
	return l
}

// owner is the name files and batches are kept under: the key's, so
// that one key never sees another's.
func owner(k *Key) string {
	if k == nil {
		return ""
	}
	return k.Name
}

func errNoSuchFile(id string) *apiError {
	return &apiError{Status: 404, Type: "invalid_request_error", Code: "file_not_found", Param: "file_id",
		Message: "no file with id `" + truncate(id, 64) + "`"}
}

func errStore() *apiError {
	return errUnavailable("the gateway's batch store is unavailable; retry shortly")
}

// createFile stores an upload for the Batch API: multipart/form-data with
// purpose=batch and the file. The upload is spooled to a temporary file
// as it arrives (never held in memory), its lines checked to be JSON
// objects, and only then copied into the store, so a slow client never
// holds the store.
func (s *Server) createFile(w http.ResponseWriter, r *http.Request, k *Key) *apiError {
	b := s.cfg.Batch
	if k != nil {
		// One upload at a time per key: a key that trickles its uploads
		// holds its own slot, not everyone's.
		if !b.startUpload(k.Name) {
			return fail(w, &apiError{Status: 429, Type: "requests", Code: "too_many_uploads", RetryAfter: 5 * time.Second,
				Message: "this API key is already uploading a file; upload one file at a time"})
		}
		defer b.endUpload(k.Name)
	}
	select {
	case b.uploads <- struct{}{}:
		defer func() { <-b.uploads }()
	default:
		return fail(w, &apiError{Status: 429, Type: "requests", Code: "too_many_uploads", RetryAfter: 5 * time.Second,
			Message: "this gateway receives as many uploads at once as it may; retry shortly"})
	}
	rc := http.NewResponseController(w)
	_ = rc.SetReadDeadline(time.Now().Add(b.UploadTimeout))
	r.Body = http.MaxBytesReader(w, r.Body, b.MaxFileBytes+1<<20)
	mr, err := r.MultipartReader()
	if err != nil {
		return fail(w, badRequest("", "send the file as multipart/form-data with the fields purpose and file"))
	}
	var purpose, filename string
	var spool *os.File
	var size int64
	defer func() {
		if spool != nil {
			_ = spool.Close()
			_ = os.Remove(spool.Name())
		}
	}()
	for {
		p, err := mr.NextPart()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fail(w, uploadError(err, b))
		}
		switch p.FormName() {
		case "purpose":
			v, err := io.ReadAll(io.LimitReader(p, 64))
			if err != nil {
				return fail(w, uploadError(err, b))
			}
			purpose = strings.TrimSpace(string(v))
		case "file":
			if spool != nil {
				return fail(w, badRequest("file", "send one file per upload"))
			}
			filename = p.FileName()
			if spool, err = os.CreateTemp("", "sous-upload-*"); err != nil {
				s.log.Error("cannot spool an upload", "err", err)
				return fail(w, errUnavailable("the gateway cannot store uploads now (its temporary directory); retry shortly"))
			}
			n, aerr := spoolLines(spool, p, b.MaxFileBytes, s.maxLine())
			if aerr != nil {
				return fail(w, aerr)
			}
			size = n
		default:
			_, _ = io.Copy(io.Discard, p)
		}
	}
	_ = rc.SetReadDeadline(time.Time{})
	switch {
	case purpose == "":
		return fail(w, badRequest("purpose", "the field purpose is required: batch"))
	case purpose != "batch":
		return fail(w, badRequest("purpose", "this gateway keeps files for the Batch API only: purpose must be batch, not %q", truncate(purpose, 32)))
	case spool == nil:
		return fail(w, badRequest("file", "the field file is required"))
	case size == 0:
		return fail(w, badRequest("file", "the file is empty"))
	}
	if _, err := spool.Seek(0, io.SeekStart); err != nil {
		return fail(w, errStore())
	}
	if filename == "" {
		filename = "upload.jsonl"
	}
	f, err := b.Store.CreateFile(r.Context(), batchstore.File{ID: "file-" + newID(), Owner: owner(k), Purpose: purpose,
		Filename: truncate(filename, 255), CreatedAt: s.cfg.Now()}, spool, b.MaxFileBytes)
	if err != nil {
		if errors.Is(err, batchstore.ErrTooLarge) {
			return fail(w, errFileTooLarge(b.MaxFileBytes))
		}
		s.log.Error("cannot store a file", "err", err)
		return fail(w, errStore())
	}
	s.log.Info("file stored", "file_id", f.ID, "bytes", f.Bytes, "key", owner(k))
	writeJSON(w, http.StatusOK, toFileObject(f))
	return nil
}

func errFileTooLarge(limit int64) *apiError {
	return &apiError{Status: 413, Type: "invalid_request_error", Code: "file_too_large", Param: "file",
		Message: "the file is larger than " + strconv.FormatInt(limit, 10) + " bytes (SOUS_GATEWAY_MAX_FILE_BYTES)"}
}

func uploadError(err error, b *BatchConfig) *apiError {
	var mbe *http.MaxBytesError
	var ne interface{ Timeout() bool }
	switch {
	case errors.As(err, &mbe):
		return errFileTooLarge(b.MaxFileBytes)
	case errors.Is(err, os.ErrDeadlineExceeded) || errors.As(err, &ne) && ne.Timeout():
		return &apiError{Status: 408, Type: "invalid_request_error", Code: "body_timeout",
			Message: "the upload did not arrive within " + b.UploadTimeout.String() + " (SOUS_GATEWAY_UPLOAD_TIMEOUT)"}
	}
	return badRequest("file", "cannot read the upload: the connection failed or the multipart body is malformed")
}

// maxLine bounds a line of a batch file: a request body, JSON-escaped in
// its line, at most twice SOUS_MAX_BODY_BYTES and some room.
func (s *Server) maxLine() int64 { return int64(s.cfg.MaxBodyBytes)*2 + 4096 }

// spoolLines copies a JSONL upload to w, checking that every non-empty
// line is a JSON object of at most maxLine bytes (a line is held whole
// while it is checked), and returns its size.
func spoolLines(w io.Writer, r io.Reader, max, maxLine int64) (int64, *apiError) {
	br := bufio.NewReaderSize(r, 64<<10)
	var n int64
	line := 0
	for {
		l, err := readLine(br, maxLine)
		if len(l) > 0 {
			line++
			n += int64(len(l))
			if n > max {
				return n, errFileTooLarge(max)
			}
			if t := bytes.TrimSpace(l); len(t) > 0 && t[0] != '{' {
				return n, &apiError{Status: 400, Type: "invalid_request_error", Code: "invalid_file_format", Param: "file",
					Message: "line " + strconv.Itoa(line) + " is not a JSON object: a batch file has one request object per line (JSONL)"}
			}
			if _, werr := w.Write(l); werr != nil {
				return n, errUnavailable("the gateway cannot store uploads now (its temporary directory); retry shortly")
			}
		}
		if errors.Is(err, io.EOF) {
			return n, nil
		}
		if err != nil {
			var mbe *http.MaxBytesError
			if errors.As(err, &mbe) {
				return n, errFileTooLarge(max)
			}
			if errors.Is(err, errLineTooLong) {
				return n, &apiError{Status: 400, Type: "invalid_request_error", Code: "invalid_file_format", Param: "file",
					Message: "line " + strconv.Itoa(line+1) + " is longer than " + strconv.FormatInt(maxLine, 10) + " bytes (twice SOUS_MAX_BODY_BYTES): a batch file has one request object per line (JSONL)"}
			}
			return n, badRequest("file", "cannot read the upload: the connection failed or the multipart body is malformed")
		}
	}
}

var errLineTooLong = errors.New("line too long")

// readLine reads one line with its newline, at most max bytes.
func readLine(br *bufio.Reader, max int64) ([]byte, error) {
	var out []byte
	for {
		frag, err := br.ReadSlice('\n')
		out = append(out, frag...)
		if int64(len(out)) > max {
			return out, errLineTooLong
		}
		if errors.Is(err, bufio.ErrBufferFull) {
			continue
		}
		return out, err
	}
}

func (s *Server) getFile(w http.ResponseWriter, r *http.Request, k *Key) *apiError {
	f, aerr := s.ownFile(r.Context(), r.PathValue("id"), k)
	if aerr != nil {
		return fail(w, aerr)
	}
	writeJSON(w, http.StatusOK, toFileObject(f))
	return nil
}

// ownFile is the file id if the key owns it; another key's file is as
// absent as a file that does not exist.
func (s *Server) ownFile(ctx context.Context, id string, k *Key) (batchstore.File, *apiError) {
	f, err := s.cfg.Batch.Store.File(ctx, id)
	if errors.Is(err, batchstore.ErrNotFound) || err == nil && f.Owner != owner(k) {
		return f, errNoSuchFile(id)
	}
	if err != nil {
		s.log.Error("batch store", "err", err)
		return f, errStore()
	}
	return f, nil
}

func (s *Server) fileContent(w http.ResponseWriter, r *http.Request, k *Key) *apiError {
	f, aerr := s.ownFile(r.Context(), r.PathValue("id"), k)
	if aerr != nil {
		return fail(w, aerr)
	}
	rc, err := s.cfg.Batch.Store.OpenFile(r.Context(), f.ID)
	if err != nil {
		s.log.Error("batch store", "err", err)
		return fail(w, errStore())
	}
	defer rc.Close()
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Length", strconv.FormatInt(f.Bytes, 10))
	w.Header().Set("Content-Disposition", `attachment; filename="`+strings.ReplaceAll(f.Filename, `"`, "")+`"`)
	w.WriteHeader(http.StatusOK)
	// Each write is bounded, so a client that stops reading lets go.
	ctl := http.NewResponseController(w)
	buf := make([]byte, 256<<10)
	for {
		n, err := rc.Read(buf)
		if n > 0 {
			_ = ctl.SetWriteDeadline(time.Now().Add(s.cfg.WriteTimeout))
			if _, werr := w.Write(buf[:n]); werr != nil {
				return nil
			}
		}
		if err != nil {
			if !errors.Is(err, io.EOF) {
				s.log.Error("reading a file from the batch store", "file_id", f.ID, "err", err)
				panic(http.ErrAbortHandler) // the client must not take a short file for a whole one
			}
			return nil
		}
	}
}

func (s *Server) deleteFile(w http.ResponseWriter, r *http.Request, k *Key) *apiError {
	f, aerr := s.ownFile(r.Context(), r.PathValue("id"), k)
	if aerr != nil {
		return fail(w, aerr)
	}
	if err := s.cfg.Batch.Store.DeleteFile(r.Context(), f.ID); err != nil && !errors.Is(err, batchstore.ErrNotFound) {
		s.log.Error("batch store", "err", err)
		return fail(w, errStore())
	}
	writeJSON(w, http.StatusOK, map[string]any{"id": f.ID, "object": "file", "deleted": true})
	return nil
}

func (s *Server) listFiles(w http.ResponseWriter, r *http.Request, k *Key) *apiError {
	q := r.URL.Query()
	limit, aerr := listLimit(q.Get("limit"), 10000, 10000)
	if aerr != nil {
		return fail(w, aerr)
	}
	asc := false
	switch q.Get("order") {
	case "", "desc":
	case "asc":
		asc = true
	default:
		return fail(w, badRequest("order", "order must be asc or desc"))
	}
	files, more, err := s.cfg.Batch.Store.Files(r.Context(), owner(k), q.Get("purpose"), q.Get("after"), limit, asc)
	if errors.Is(err, batchstore.ErrNotFound) {
		return fail(w, badRequest("after", "no file with id `%s` to list after", truncate(q.Get("after"), 64)))
	}
	if err != nil {
		s.log.Error("batch store", "err", err)
		return fail(w, errStore())
	}
	out := make([]fileObject, 0, len(files))
	for _, f := range files {
		out = append(out, toFileObject(f))
	}
	writeJSON(w, http.StatusOK, newList(out, func(f fileObject) string { return f.ID }, more))
	return nil
}

func listLimit(v string, def, max int) (int, *apiError) {
	if v == "" {
		return def, nil
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 1 || n > max {
		return 0, badRequest("limit", "limit must be a whole number from 1 to %d", max)
	}
	return n, nil
}
