package gateway

import (
	"errors"
	"net/http"
	"regexp"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/sous-run/sous/internal/gateway/batchstore"
	"github.com/sous-run/sous/internal/lanes"
)

// BatchConfig turns on the Batch API (/v1/files and /v1/batches): files
// and batches are kept in Store, batch lines go to Lane's queue with the
// batch's deadline, and their results come back on ResultsQueue.
type BatchConfig struct {
	Store *batchstore.Store
	// Lane is where batch lines go: SOUS_GATEWAY_BATCH_LANE, by default
	// the last (lowest) of SOUS_GATEWAY_LANES, else SOUS_QUEUE.
	Lane lanes.Lane
	// ResultsQueue is where workers send the lines' results
	// (SOUS_GATEWAY_BATCH_RESULTS_QUEUE, default sous.batch.results).
	ResultsQueue string
	// MaxFileBytes bounds an upload (SOUS_GATEWAY_MAX_FILE_BYTES, default
	// 200 MiB); MaxLines a batch's requests (SOUS_GATEWAY_BATCH_MAX_LINES,
	// default 50000), as OpenAI's limits.
	MaxFileBytes int64
	MaxLines     int
	// Outstanding bounds the lines of all batches published and not yet
	// answered (SOUS_GATEWAY_BATCH_OUTSTANDING, default 1000): a batch of
	// 50,000 never floods the queue, and batches share it evenly.
	Outstanding int
	// UploadTimeout bounds the reading of one upload
	// (SOUS_GATEWAY_UPLOAD_TIMEOUT, default 10m); MaxUploads the uploads
	// read at once (default 4).
	UploadTimeout time.Duration
	MaxUploads    int
	// Holder names this replica in the publisher's lease; LeaseTTL is how
	// long a replica that died keeps it (default 15s).
	Holder   string
	LeaseTTL time.Duration
	// CancelGrace bounds the wait, after a cancel, for the lines already
	// queued (SOUS_GATEWAY_BATCH_CANCEL_GRACE, default 10m): then the
	// batch is cancelled whatever is still out.
	CancelGrace time.Duration
	// Poll is how often the publisher looks at the batches (default
	// 200ms; sooner when this replica records results).
	Poll time.Duration

	uploads   chan struct{}
	wake      chan struct{}
	upMu      sync.Mutex
	uploading map[string]bool // keys uploading now
}

func (b *BatchConfig) startUpload(key string) bool {
	b.upMu.Lock()
	defer b.upMu.Unlock()
	if b.uploading[key] {
		return false
	}
	b.uploading[key] = true
	return true
}

func (b *BatchConfig) endUpload(key string) {
	b.upMu.Lock()
	defer b.upMu.Unlock()
	delete(b.uploading, key)
}

func (b *BatchConfig) defaults() {
	if b.MaxFileBytes <= 0 {
		b.MaxFileBytes = 200 << 20
	}
	if b.MaxLines <= 0 {
		b.MaxLines = 50000
	}
	if b.Outstanding <= 0 {
		b.Outstanding = 1000
	}
	if b.UploadTimeout <= 0 {
		b.UploadTimeout = 10 * time.Minute
	}
	if b.MaxUploads <= 0 {
		b.MaxUploads = 4
	}
	if b.LeaseTTL <= 0 {
		b.LeaseTTL = 15 * time.Second
	}
	if b.CancelGrace <= 0 {
		b.CancelGrace = 10 * time.Minute
	}
	if b.Poll <= 0 {
		b.Poll = 200 * time.Millisecond
	}
	if b.ResultsQueue == "" {
		b.ResultsQueue = "sous.batch.results"
	}
	if b.Holder == "" {
		b.Holder = "gateway-" + newID()[:12]
	}
	b.uploads = make(chan struct{}, b.MaxUploads)
	b.uploading = map[string]bool{}
	b.wake = make(chan struct{}, 1)
}

func (b *BatchConfig) poke() {
	select {
	case b.wake <- struct{}{}:
	default:
	}
}

func (s *Server) routeBatches() {
	s.handle("POST /v1/files", s.createFile)
	s.handle("GET /v1/files", s.listFiles)
	s.handle("GET /v1/files/{id}", s.getFile)
	s.handle("GET /v1/files/{id}/content", s.fileContent)
	s.handle("DELETE /v1/files/{id}", s.deleteFile)
	s.handle("POST /v1/batches", s.createBatch)
	s.handle("GET /v1/batches", s.listBatches)
	s.handle("GET /v1/batches/{id}", s.getBatch)
	s.handle("POST /v1/batches/{id}/cancel", s.cancelBatch)
}

// batchObject is OpenAI's Batch object.
type batchObject struct {
	ID               string            `json:"id"`
	Object           string            `json:"object"`
	Endpoint         string            `json:"endpoint"`
	Errors           *batchErrors      `json:"errors"`
	InputFileID      string            `json:"input_file_id"`
	CompletionWindow string            `json:"completion_window"`
	Status           string            `json:"status"`
	OutputFileID     *string           `json:"output_file_id"`
	ErrorFileID      *string           `json:"error_file_id"`
	CreatedAt        int64             `json:"created_at"`
	InProgressAt     *int64            `json:"in_progress_at"`
	ExpiresAt        *int64            `json:"expires_at"`
	FinalizingAt     *int64            `json:"finalizing_at"`
	CompletedAt      *int64            `json:"completed_at"`
	FailedAt         *int64            `json:"failed_at"`
	ExpiredAt        *int64            `json:"expired_at"`
	CancellingAt     *int64            `json:"cancelling_at"`
	CancelledAt      *int64            `json:"cancelled_at"`
	RequestCounts    requestCounts     `json:"request_counts"`
	Metadata         map[string]string `json:"metadata"`
}

type batchErrors struct {
	Object string       `json:"object"`
	Data   []batchError `json:"data"`
}

type batchError struct {
	Code    string  `json:"code"`
	Message string  `json:"message"`
	Param   *string `json:"param"`
	Line    *int    `json:"line"`
}

type requestCounts struct {
	Total     int `json:"total"`
	Completed int `json:"completed"`
	Failed    int `json:"failed"`
}

func unix(t time.Time) *int64 {
	if t.IsZero() {
		return nil
	}
	u := t.Unix()
	return &u
}

func orNil(s string) *string {
	if s == "" {
		return nil
	}
	return &s
}

func toBatchObject(b batchstore.Batch) batchObject {
	o := batchObject{ID: b.ID, Object: "batch", Endpoint: b.Endpoint, InputFileID: b.InputFileID,
		CompletionWindow: b.CompletionWindow, Status: string(b.Status), OutputFileID: orNil(b.OutputFileID),
		ErrorFileID: orNil(b.ErrorFileID), CreatedAt: b.CreatedAt.Unix(), InProgressAt: unix(b.InProgressAt),
		ExpiresAt: unix(b.ExpiresAt), FinalizingAt: unix(b.FinalizingAt), CompletedAt: unix(b.CompletedAt),
		FailedAt: unix(b.FailedAt), ExpiredAt: unix(b.ExpiredAt), CancellingAt: unix(b.CancellingAt),
		CancelledAt: unix(b.CancelledAt), Metadata: b.Metadata,
		RequestCounts: requestCounts{Total: b.Total, Completed: b.Completed, Failed: b.Failed}}
	if len(b.Errors) > 0 {
		o.Errors = &batchErrors{Object: "list"}
		for _, e := range b.Errors {
			be := batchError{Code: e.Code, Message: e.Message, Param: orNil(e.Param)}
			if e.Line > 0 {
				line := e.Line
				be.Line = &line
			}
			o.Errors.Data = append(o.Errors.Data, be)
		}
	}
	return o
}

type createBatchRequest struct {
	InputFileID      string            `json:"input_file_id"`
	Endpoint         string            `json:"endpoint"`
	CompletionWindow string            `json:"completion_window"`
	Metadata         map[string]string `json:"metadata"`
	// Sent by newer clients; only its default is supported.
	OutputExpiresAfter any `json:"output_expires_after"`
}

// batchEndpoints are the endpoints a batch may run, and how each is
// answered.
var batchEndpoints = map[string]endpoint{
	"/v1/chat/completions": epChat,
	"/v1/completions":      epCompletion,
	"/v1/embeddings":       epEmbedding,
}

var windowSyntax = regexp.MustCompile(`^[1-9][0-9]{0,4}[mh]$`)

// parseWindow reads a completion window: OpenAI's "24h", and (an
// extension) any whole number of minutes or hours from 1m to 168h.
func parseWindow(s string) (time.Duration, bool) {
	if !windowSyntax.MatchString(s) {
		return 0, false
	}
	d, err := time.ParseDuration(s)
	if err != nil || d < time.Minute || d > 168*time.Hour {
		return 0, false
	}
	return d, true
}

func (s *Server) createBatch(w http.ResponseWriter, r *http.Request, k *Key) *apiError {
	body, aerr := s.readBody(w, r)
	if aerr != nil {
		return fail(w, aerr)
	}
	var c createBatchRequest
	if aerr := decodeJSON(body, &c); aerr != nil {
		return fail(w, aerr)
	}
	if _, ok := batchEndpoints[c.Endpoint]; !ok {
		return fail(w, badRequest("endpoint", "endpoint must be /v1/chat/completions, /v1/completions or /v1/embeddings"))
	}
	window, ok := parseWindow(c.CompletionWindow)
	if !ok {
		return fail(w, badRequest("completion_window", "completion_window must be 24h (this gateway also takes a whole number of minutes or hours from 1m to 168h, such as 30m)"))
	}
	if aerr := checkMetadata(c.Metadata); aerr != nil {
		return fail(w, aerr)
	}
	if c.InputFileID == "" {
		return fail(w, badRequest("input_file_id", "input_file_id is required: the id of a file uploaded with purpose batch"))
	}
	f, aerr := s.ownFile(r.Context(), c.InputFileID, k)
	if aerr != nil {
		aerr.Param = "input_file_id"
		return fail(w, aerr)
	}
	if f.Purpose != "batch" {
		return fail(w, badRequest("input_file_id", "the file %s has purpose %s: a batch needs a file uploaded with purpose batch", f.ID, f.Purpose))
	}
	now := s.cfg.Now()
	b := batchstore.Batch{ID: "batch_" + newID(), Owner: owner(k), Endpoint: c.Endpoint, InputFileID: f.ID,
		CompletionWindow: c.CompletionWindow, Queue: s.cfg.Batch.Lane.Queue, Status: batchstore.Validating,
		Metadata: c.Metadata, CreatedAt: now, ExpiresAt: now.Add(window)}
	if err := s.cfg.Batch.Store.CreateBatch(r.Context(), b); err != nil {
		s.log.Error("batch store", "err", err)
		return fail(w, errStore())
	}
	s.log.Info("batch created", "batch_id", b.ID, "input_file_id", f.ID, "endpoint", b.Endpoint, "key", b.Owner)
	s.cfg.Batch.poke()
	writeJSON(w, http.StatusOK, toBatchObject(b))
	return nil
}

func checkMetadata(m map[string]string) *apiError {
	if len(m) > 16 {
		return badRequest("metadata", "metadata holds at most 16 pairs")
	}
	for k, v := range m {
		if utf8.RuneCountInString(k) > 64 || utf8.RuneCountInString(v) > 512 {
			return badRequest("metadata", "metadata keys are at most 64 characters and values at most 512")
		}
	}
	return nil
}

// ownBatch is the batch id if the key owns it; another key's batch is as
// absent as one that does not exist.
func (s *Server) ownBatch(r *http.Request, k *Key) (batchstore.Batch, *apiError) {
	id := r.PathValue("id")
	b, err := s.cfg.Batch.Store.Batch(r.Context(), id)
	if errors.Is(err, batchstore.ErrNotFound) || err == nil && b.Owner != owner(k) {
		return b, &apiError{Status: 404, Type: "invalid_request_error", Code: "batch_not_found", Param: "batch_id",
			Message: "no batch with id `" + truncate(id, 64) + "`"}
	}
	if err != nil {
		s.log.Error("batch store", "err", err)
		return b, errStore()
	}
	return b, nil
}

func (s *Server) getBatch(w http.ResponseWriter, r *http.Request, k *Key) *apiError {
	b, aerr := s.ownBatch(r, k)
	if aerr != nil {
		return fail(w, aerr)
	}
	writeJSON(w, http.StatusOK, toBatchObject(b))
	return nil
}

func (s *Server) cancelBatch(w http.ResponseWriter, r *http.Request, k *Key) *apiError {
	b, aerr := s.ownBatch(r, k)
	if aerr != nil {
		return fail(w, aerr)
	}
	ok, err := s.cfg.Batch.Store.Transition(r.Context(), b.ID, []batchstore.Status{batchstore.Validating, batchstore.InProgress},
		batchstore.Cancelling, s.cfg.Now())
	if err != nil {
		s.log.Error("batch store", "err", err)
		return fail(w, errStore())
	}
	if b, err = s.cfg.Batch.Store.Batch(r.Context(), b.ID); err != nil {
		s.log.Error("batch store", "err", err)
		return fail(w, errStore())
	}
	if !ok && b.Status != batchstore.Cancelling {
		return fail(w, &apiError{Status: 409, Type: "invalid_request_error", Code: "batch_not_cancellable",
			Message: "the batch is " + string(b.Status) + ": only a batch validating or in progress can be cancelled"})
	}
	if ok {
		s.log.Info("batch cancelling", "batch_id", b.ID)
	}
	s.cfg.Batch.poke()
	writeJSON(w, http.StatusOK, toBatchObject(b))
	return nil
}

func (s *Server) listBatches(w http.ResponseWriter, r *http.Request, k *Key) *apiError {
	q := r.URL.Query()
	limit, aerr := listLimit(q.Get("limit"), 20, 100)
	if aerr != nil {
		return fail(w, aerr)
	}
	bs, more, err := s.cfg.Batch.Store.Batches(r.Context(), owner(k), q.Get("after"), limit)
	if errors.Is(err, batchstore.ErrNotFound) {
		return fail(w, badRequest("after", "no batch with id `%s` to list after", truncate(q.Get("after"), 64)))
	}
	if err != nil {
		s.log.Error("batch store", "err", err)
		return fail(w, errStore())
	}
	out := make([]batchObject, 0, len(bs))
	for _, b := range bs {
		out = append(out, toBatchObject(b))
	}
	writeJSON(w, http.StatusOK, newList(out, func(b batchObject) string { return b.ID }, more))
	return nil
}
