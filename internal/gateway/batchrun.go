package gateway

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/metric/noop"

	"github.com/sous-run/sous/internal/fleet"
	"github.com/sous-run/sous/internal/gateway/batchstore"
	"github.com/sous-run/sous/internal/wire"
)

// BatchBroker is what the Batch API needs from the broker: confirmed
// publishes whose results go to a queue, and that queue's deliveries.
// *AMQP is one.
type BatchBroker interface {
	Publish(ctx context.Context, m Message) error
	BatchResults() <-chan Delivery
}

var _ BatchBroker = (*AMQP)(nil)

// The Batch API's work, on every replica:
//   - recording results: every replica consumes the results queue
//     (competing consumers) and writes each result by (batch, custom_id),
//     so a redelivered result never makes a second line;
//   - leading: the replica that holds the store's lease validates new
//     batches, publishes lines (at most Outstanding of all batches out at
//     once, shared evenly), and finalizes, expires and cancels batches. A
//     replica that dies loses the lease after LeaseTTL and another (or its
//     restart) takes over from the store: a line published twice is
//     answered twice and recorded once.
const leaseName = "batch-publisher"

// RunBatches runs the Batch API's background work until ctx is done.
// It returns at once when the Batch API is off.
func (s *Server) RunBatches(ctx context.Context, br BatchBroker) {
	b := s.cfg.Batch
	if b == nil {
		return
	}
	r := &runner{s: s, b: b, br: br, m: newBatchMetrics(s.cfg.Meter, b.Store, s.log), announced: map[string]bool{}}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); r.record(ctx) }()
	go func() { defer wg.Done(); r.lead(ctx) }()
	wg.Wait()
	r.validations.Wait()
}

type runner struct {
	s  *Server
	b  *BatchConfig
	br BatchBroker
	m  batchMetrics

	validations sync.WaitGroup
	mu          sync.Mutex
	validating  map[string]bool

	announced map[string]bool // cancelling batches told to the workers (lead's goroutine only)
	leadCtx   context.Context // lasts while this replica holds the lease (lead's goroutine only)
}

// record writes the results this replica takes, many to a transaction,
// and acks them once written. A failed write hands them back.
func (r *runner) record(ctx context.Context) {
	in := r.br.BatchResults()
	for {
		var ds []Delivery
		select {
		case <-ctx.Done():
			return
		case d := <-in:
			ds = append(ds, d)
		}
	more:
		for len(ds) < 256 {
			select {
			case d := <-in:
				ds = append(ds, d)
			default:
				break more
			}
		}
		var rs []batchstore.Result
		var keep []Delivery
		for _, d := range ds {
			res, ok := r.result(d)
			if !ok {
				_ = d.Ack()
				continue
			}
			rs = append(rs, res)
			keep = append(keep, d)
		}
		if len(rs) == 0 {
			continue
		}
		// A store that fails is retried with the results held, not handed
		// back: a requeue counts against the queue's delivery limit, and
		// an outage of the database must not cost results.
		n, err := r.b.Store.RecordResults(ctx, rs)
		for wait := time.Second; err != nil; wait = min(2*wait, 30*time.Second) {
			if ctx.Err() != nil {
				return // unacked: the broker hands them to another replica
			}
			r.s.log.Error("cannot record batch results; retrying", "results", len(rs), "retry_in", wait, "err", err)
			select {
			case <-ctx.Done():
				return
			case <-time.After(wait):
			}
			n, err = r.b.Store.RecordResults(ctx, rs)
		}
		unknown := map[string]bool{}
		if n < len(rs) {
			unknown = r.unknownBatches(ctx, rs)
		}
		handedBack := 0
		dropped := 0
		for i, d := range keep {
			if unknown[rs[i].BatchID] {
				if d.Returned >= maxHandBacks {
					dropped++ // no store has it: a result of a store that is gone
					_ = d.Ack()
					continue
				}
				handedBack++
				_ = d.Nack()
				continue
			}
			_ = d.Ack()
		}
		if dropped > 0 {
			r.s.log.Warn("results of batches no gateway's store knows, dropped after being handed back", "results", dropped, "times", maxHandBacks)
		}
		r.m.recorded(n)
		if handedBack > 0 {
			r.s.log.Warn("results of batches this gateway's store does not know, handed back to the queue: does another gateway with a store of its own consume SOUS_GATEWAY_BATCH_RESULTS_QUEUE? Give each store its own queue",
				"results", handedBack)
		}
		if dup := len(rs) - n - handedBack - dropped; dup > 0 {
			// A redelivery (a worker or a gateway died before its ack), a
			// line published again after a failover, or a late result of
			// a finished batch: recorded once, or not at all.
			r.s.log.Info("duplicate or late batch results ignored", "count", dup)
		}
		r.b.poke()
	}
}

// maxHandBacks is how often a result of a batch this store does not know
// goes back to the queue, for another store's gateway, before it is
// dropped.
const maxHandBacks = 10

// unknownBatches are the batches of rs that this store does not know.
func (r *runner) unknownBatches(ctx context.Context, rs []batchstore.Result) map[string]bool {
	var ids []string
	seen := map[string]bool{}
	for _, res := range rs {
		if !seen[res.BatchID] {
			seen[res.BatchID] = true
			ids = append(ids, res.BatchID)
		}
	}
	known, err := r.b.Store.Known(ctx, ids)
	if err != nil {
		return nil // acked as duplicates: the store just took the results
	}
	out := map[string]bool{}
	for _, id := range ids {
		if !known[id] {
			out[id] = true
		}
	}
	return out
}

// corrPrefix starts the correlation id of every batch line:
// sous-batch:<batch id>:<index>:<endpoint letter><flags>.
const corrPrefix = "sous-batch:"

func lineCorrelation(batchID string, index int, ep endpoint, base64 bool) string {
	tail := map[endpoint]string{epChat: "c", epCompletion: "t", epEmbedding: "e"}[ep]
	if base64 {
		tail += "b"
	}
	return corrPrefix + batchID + ":" + strconv.Itoa(index) + ":" + tail
}

func parseCorrelation(c string) (batchID string, index int, ep endpoint, base64 bool, ok bool) {
	rest, found := strings.CutPrefix(c, corrPrefix)
	if !found {
		return "", 0, 0, false, false
	}
	parts := strings.Split(rest, ":")
	if len(parts) != 3 || parts[0] == "" || parts[2] == "" {
		return "", 0, 0, false, false
	}
	index, err := strconv.Atoi(parts[1])
	if err != nil || index < 0 {
		return "", 0, 0, false, false
	}
	switch parts[2][0] {
	case 'c':
		ep = epChat
	case 't':
		ep = epCompletion
	case 'e':
		ep = epEmbedding
	default:
		return "", 0, 0, false, false
	}
	return parts[0], index, ep, strings.Contains(parts[2][1:], "b"), true
}

// outputLine is a line of a batch's output or error file, as OpenAI
// writes them.
type outputLine struct {
	ID       string        `json:"id"`
	CustomID string        `json:"custom_id"`
	Response *lineResponse `json:"response"`
	Error    *lineError    `json:"error"`
}

type lineResponse struct {
	StatusCode int    `json:"status_code"`
	RequestID  string `json:"request_id"`
	Body       any    `json:"body"`
}

type lineError struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// result turns a delivery into the line it adds to its batch's file.
func (r *runner) result(d Delivery) (batchstore.Result, bool) {
	if d.Chunk {
		return batchstore.Result{}, false // batch lines are not streamed
	}
	batchID, index, ep, b64, ok := parseCorrelation(d.CorrelationID)
	if !ok {
		r.s.log.Warn("a message on the batch results queue is not a batch line's result; dropped", "correlation_id", truncate(d.CorrelationID, 100))
		return batchstore.Result{}, false
	}
	var res wire.Result
	if err := json.Unmarshal(d.Body, &res); err != nil || res.ID == "" {
		r.s.log.Warn("a batch line's result is not a sous result; dropped", "batch_id", batchID, "index", index)
		return batchstore.Result{}, false
	}
	reqID := batchID + "-" + strconv.Itoa(index)
	line := outputLine{ID: "batch_req_" + newID(), CustomID: res.ID}
	ok = res.Status == wire.StatusOK
	switch {
	case ok:
		a := &answer{ep: ep, base64: b64, id: map[endpoint]string{epChat: "chatcmpl-", epCompletion: "cmpl-"}[ep] + reqID,
			created: r.s.cfg.Now().Unix(), model: res.Model}
		line.Response = &lineResponse{StatusCode: 200, RequestID: reqID, Body: a.body(&res)}
	case res.Error != nil && res.Error.Code == wire.ReasonExpired:
		line.Error = &lineError{Code: "batch_expired", Message: "This request could not be executed before the completion window expired."}
	case res.Error != nil && res.Error.Code == wire.ReasonCancelled:
		line.Error = &lineError{Code: "batch_cancelled", Message: "This request was cancelled before it could be executed."}
	default:
		e := res.Error
		if e == nil {
			e = &wire.ErrorInfo{Code: "unknown", Message: "the worker reported an error without details"}
		}
		r.s.log.Debug("a batch line failed", "batch_id", batchID, "index", index, "code", e.Code, "detail", e.Message)
		ae := fromResult(e, res.Model, reqID)
		line.Response = &lineResponse{StatusCode: ae.Status, RequestID: reqID, Body: ae.body()}
	}
	out, _ := json.Marshal(line)
	return batchstore.Result{BatchID: batchID, Index: index, CustomID: res.ID, OK: ok, Line: out}, true
}

// lead keeps the lease and, while it holds it, moves the batches on.
func (r *runner) lead(ctx context.Context) {
	t := time.NewTicker(r.b.Poll)
	defer t.Stop()
	leading := false
	var lastDemand, renewed time.Time
	var lastRunning string // the running batches the last demand report described
	// leadCtx lasts while this replica holds the lease: validations run
	// in it, so that a replica that lost the lease stops validating.
	type term struct {
		ctx context.Context
		end context.CancelFunc
	}
	newTerm := func() term {
		c, end := context.WithCancel(ctx)
		return term{c, end}
	}
	lead := newTerm()
	defer func() {
		lead.end()
		if leading {
			// Hand the lease on at once rather than after its time to live.
			rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
			_, _ = r.b.Store.Lease(rctx, leaseName, r.b.Holder, time.Nanosecond, time.Now())
			cancel()
		}
	}()
	for {
		// The lease is renewed every third of its time to live, not every
		// step: a write to the store each time.
		var held bool
		var err error
		if now := time.Now(); leading && now.Sub(renewed) < r.b.LeaseTTL/3 {
			held = true
		} else if held, err = r.b.Store.Lease(ctx, leaseName, r.b.Holder, r.b.LeaseTTL, now); err == nil && held {
			renewed = now
		}
		switch {
		case err != nil && ctx.Err() == nil:
			r.s.log.Warn("batch store: cannot take the publisher's lease", "err", err)
		case held && !leading:
			r.s.log.Info("this gateway now publishes batch lines", "holder", r.b.Holder)
		case !held && leading:
			r.s.log.Info("another gateway publishes batch lines now")
		}
		if leading && !(held && err == nil) {
			lead.end()
			lead = newTerm()
		}
		r.leadCtx = lead.ctx
		leading = held && err == nil
		if leading {
			// A step ends before the lease could pass to another replica.
			stepCtx, cancel := context.WithDeadline(lead.ctx, renewed.Add(r.b.LeaseTTL*2/3))
			active := r.step(stepCtx)
			cancel()
			// At once when a batch starts or ends, else every demandEvery:
			// a short batch is over before the first periodic report.
			if now, key := time.Now(), runningKey(active); key != lastRunning || now.Sub(lastDemand) >= demandEvery {
				lastDemand, lastRunning = now, key
				r.demand(lead.ctx, active)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-r.b.wake:
		}
	}
}

// step moves every active batch on once, and returns them as they were.
func (r *runner) step(ctx context.Context) []batchstore.Batch {
	active, err := r.b.Store.Active(ctx)
	if err != nil {
		if ctx.Err() == nil {
			r.s.log.Warn("batch store: cannot list active batches", "err", err)
		}
		return nil
	}
	now := r.s.cfg.Now()
	var running []batchstore.Batch
	for _, b := range active {
		switch b.Status {
		case batchstore.Validating:
			if !now.Before(b.ExpiresAt) {
				r.fail(ctx, b, []batchstore.LineError{{Code: "batch_expired", Message: "the completion window ended before the input file was validated"}})
				continue
			}
			r.startValidation(r.leadCtx, b)
		case batchstore.InProgress:
			switch {
			case b.Completed+b.Failed >= b.Total:
				if ok, err := r.b.Store.Transition(ctx, b.ID, []batchstore.Status{batchstore.InProgress}, batchstore.Finalizing, now); err == nil && ok {
					r.finalize(ctx, b, batchstore.Finalizing, batchstore.Completed, "", "")
				}
			case !now.Before(b.ExpiresAt):
				r.finalize(ctx, b, batchstore.InProgress, batchstore.Expired, "batch_expired",
					"This request could not be executed before the completion window expired.")
			default:
				running = append(running, b)
			}
		case batchstore.Finalizing:
			r.finalize(ctx, b, batchstore.Finalizing, batchstore.Completed, "", "")
		case batchstore.Cancelling:
			if !r.announced[b.ID] {
				r.announced[b.ID] = true
				r.cancel(ctx, b)
			}
			if b.InProgressAt.IsZero() {
				// Cancelled while validating: nothing of it was published.
				if err := r.b.Store.DeleteLines(ctx, b.ID); err != nil {
					continue
				}
			}
			if outstanding(b) <= 0 || now.Sub(b.CancellingAt) >= r.b.CancelGrace {
				r.finalize(ctx, b, batchstore.Cancelling, batchstore.Cancelled, "batch_cancelled",
					"This request was cancelled before it could be executed.")
			}
		}
	}
	r.publish(ctx, running)
	return active
}

// cancelPublisher is what cancelling a batch's queued lines needs from
// the broker.
type cancelPublisher interface {
	PublishCancel(ctx context.Context, body []byte) error
}

// cancel tells the workers to answer the batch's lines still queued
// "cancelled" instead of running them (wire.Cancel; RabbitMQ's queues
// cannot give back a message from their middle). Its lines' correlation
// ids start with the prefix.
func (r *runner) cancel(ctx context.Context, b batchstore.Batch) {
	cp, ok := r.br.(cancelPublisher)
	if !ok {
		return
	}
	body, _ := json.Marshal(wire.Cancel{Prefix: corrPrefix + b.ID + ":", Until: b.ExpiresAt})
	if err := cp.PublishCancel(ctx, body); err != nil && ctx.Err() == nil {
		r.s.log.Warn("cannot tell the workers a batch is cancelled; its queued lines will run", "batch_id", b.ID, "err", err)
	}
}

// runningKey names the set of batches in progress, to notice one
// starting or ending.
func runningKey(active []batchstore.Batch) string {
	var ids []string
	for _, b := range active {
		if b.Status == batchstore.InProgress {
			ids = append(ids, b.ID)
		}
	}
	slices.Sort(ids)
	return strings.Join(ids, ",")
}

// demandEvery is how often the publisher tells the scaler what its
// batches still need (fleet.Demand), well within fleet.ReportTTL.
const demandEvery = 5 * time.Second

// demandPublisher is what the demand reports need from the broker.
type demandPublisher interface {
	PublishDemand(ctx context.Context, body []byte) error
}

// demand tells the scaler the requests the running batches still need
// answered by each batch's deadline, per queue: the broker cannot tell
// it the deadlines of what it holds, and the lines not yet published are
// not in it at all. The batch lane's queue always gets one, empty when
// nothing runs, so that a finished batch stops raising the metric at once.
func (r *runner) demand(ctx context.Context, active []batchstore.Batch) {
	dp, ok := r.br.(demandPublisher)
	if !ok {
		return
	}
	byQueue := map[string]map[time.Time]int{r.b.Lane.Queue: {}}
	for _, b := range active {
		left := b.Total - b.Completed - b.Failed
		if b.Status != batchstore.InProgress || left <= 0 {
			continue
		}
		if byQueue[b.Queue] == nil {
			byQueue[b.Queue] = map[time.Time]int{}
		}
		byQueue[b.Queue][b.ExpiresAt] += left
	}
	now := r.s.cfg.Now()
	for _, b := range active {
		if b.Status == batchstore.Cancelling {
			r.cancel(ctx, b) // again: a worker that was away hears it now
		}
	}
	for q, due := range byQueue {
		d := fleet.Demand{Kind: fleet.KindDemand, Source: r.b.Holder, Queue: q, At: now, Due: []fleet.Due{}}
		for by, n := range due {
			d.Due = append(d.Due, fleet.Due{By: by, Requests: n})
		}
		slices.SortFunc(d.Due, func(a, b fleet.Due) int { return a.By.Compare(b.By) })
		body, _ := json.Marshal(d)
		if err := dp.PublishDemand(ctx, body); err != nil && ctx.Err() == nil {
			r.s.log.Debug("cannot send the scaler a demand report", "err", err)
		}
	}
}

// outstanding are a batch's lines published and not yet answered.
func outstanding(b batchstore.Batch) int {
	return b.Published - b.Completed - b.Failed
}

func (r *runner) finalize(ctx context.Context, b batchstore.Batch, from, to batchstore.Status, code, msg string) {
	unfinished := func(customID string) []byte {
		out, _ := json.Marshal(outputLine{ID: "batch_req_" + newID(), CustomID: customID, Error: &lineError{Code: code, Message: msg}})
		return out
	}
	ok, err := r.b.Store.Finalize(ctx, b.ID, []batchstore.Status{from}, to, "file-"+newID(), "file-"+newID(), unfinished, r.s.cfg.Now())
	if err != nil {
		if ctx.Err() == nil {
			r.s.log.Error("batch store: cannot finalize a batch", "batch_id", b.ID, "to", to, "err", err)
		}
		return
	}
	if ok {
		r.s.log.Info("batch "+string(to), "batch_id", b.ID, "total", b.Total, "completed", b.Completed, "failed", b.Failed)
	}
}

// publish tops up the lines out of every running batch: at most
// Outstanding of all batches at once, each batch at most its even share.
func (r *runner) publish(ctx context.Context, running []batchstore.Batch) {
	if len(running) == 0 {
		return
	}
	budget := r.b.Outstanding
	for _, b := range running {
		budget -= max(outstanding(b), 0)
	}
	share := (r.b.Outstanding + len(running) - 1) / len(running)
	for _, b := range running {
		want := min(share-max(outstanding(b), 0), budget, b.Total-b.Published)
		if want <= 0 {
			continue
		}
		lines, err := r.b.Store.Unpublished(ctx, b.ID, want)
		if err != nil {
			if ctx.Err() == nil {
				r.s.log.Warn("batch store: cannot read lines to publish", "batch_id", b.ID, "err", err)
			}
			return
		}
		budget -= len(lines)
		done := r.sendLines(ctx, b, lines)
		if len(done) > 0 {
			// Confirmed by the broker: mark them even if the step ends now,
			// or the next publisher sends them again.
			mctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			err := r.b.Store.MarkPublished(mctx, b.ID, done)
			cancel()
			if err != nil {
				// Published again by the next step: recorded once.
				r.s.log.Warn("batch store: cannot mark lines published", "batch_id", b.ID, "err", err)
			}
			r.m.published.Add(context.Background(), int64(len(done)))
		}
		if len(done) < len(lines) {
			return // the broker refuses: try again on the next step
		}
	}
}

// sendLines publishes lines, 64 at a time, and returns the indexes the
// broker confirmed.
func (r *runner) sendLines(ctx context.Context, b batchstore.Batch, lines []batchstore.Line) []int {
	ep := batchEndpoints[b.Endpoint]
	var mu sync.Mutex
	var done []int
	var failed error
	sem := make(chan struct{}, 64)
	var wg sync.WaitGroup
	for _, l := range lines {
		b64, req := unpackLine(l.Request)
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			id := lineCorrelation(b.ID, l.Index, ep, b64)
			err := r.br.Publish(ctx, Message{ID: id, Queue: b.Queue, Body: req, ReplyTo: r.b.ResultsQueue})
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				failed = err
				return
			}
			done = append(done, l.Index)
		}()
	}
	wg.Wait()
	if failed != nil && ctx.Err() == nil {
		r.s.log.Warn("cannot publish batch lines; retrying", "batch_id", b.ID, "queue", b.Queue, "err", failed)
	}
	return done
}

// A stored line is a flag byte, then the request: 'b' for embeddings
// answered in base64, '-' otherwise.
func packLine(base64 bool, req []byte) []byte {
	flag := byte('-')
	if base64 {
		flag = 'b'
	}
	return append([]byte{flag}, req...)
}

func unpackLine(p []byte) (bool, []byte) {
	if len(p) == 0 {
		return false, p
	}
	return p[0] == 'b', p[1:]
}

func (r *runner) startValidation(ctx context.Context, b batchstore.Batch) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.validating == nil {
		r.validating = map[string]bool{}
	}
	if r.validating[b.ID] || len(r.validating) >= 2 {
		return
	}
	r.validating[b.ID] = true
	r.validations.Add(1)
	go func() {
		defer r.validations.Done()
		defer func() {
			r.mu.Lock()
			delete(r.validating, b.ID)
			r.mu.Unlock()
		}()
		r.validate(ctx, b)
		r.b.poke()
	}()
}

// maxErrors bounds the errors a failed batch reports.
const maxErrors = 100

// validate reads the batch's input file line by line (never whole),
// checks and translates every request as the live endpoints do, and
// stores them as the batch's lines: the batch goes in_progress, or
// failed with the errors found (their line numbers are the file's).
func (r *runner) validate(ctx context.Context, b batchstore.Batch) {
	start := time.Now()
	log := r.s.log.With("batch_id", b.ID)
	st := r.b.Store
	if err := st.DeleteLines(ctx, b.ID); err != nil { // a validation cut short before
		if !errors.Is(err, batchstore.ErrNotValidating) && ctx.Err() == nil {
			log.Warn("batch store: cannot validate now", "err", err)
		}
		return
	}
	var k *Key
	if r.s.cfg.Keys != nil {
		if k = r.s.cfg.Keys.Named(b.Owner); k == nil {
			r.fail(ctx, b, []batchstore.LineError{{Code: "invalid_api_key", Message: "the API key that created this batch is no longer in the keys file"}})
			return
		}
	}
	v := validator{s: r.s, ep: batchEndpoints[b.Endpoint], url: b.Endpoint, models: r.s.allowed(k), deadline: b.ExpiresAt,
		seen: map[[16]byte]int{}, maxLines: r.b.MaxLines}
	rc, err := st.OpenFile(ctx, b.InputFileID)
	if errors.Is(err, batchstore.ErrNotFound) {
		r.fail(ctx, b, []batchstore.LineError{{Code: "file_not_found", Message: "the input file was deleted", Param: "input_file_id"}})
		return
	}
	if err != nil {
		log.Warn("batch store: cannot read the input file", "err", err)
		return
	}
	defer rc.Close()
	br := bufio.NewReaderSize(rc, 64<<10)
	var pending []batchstore.Line
	flush := func() error {
		if len(pending) == 0 || len(v.errs) > 0 {
			pending = pending[:0]
			return nil
		}
		err := st.AddLines(ctx, b.ID, pending)
		pending = pending[:0]
		return err
	}
	lineNo := 0
	for {
		raw, rerr := readLine(br, int64(r.s.cfg.MaxBodyBytes)*2+4096)
		if len(raw) > 0 {
			lineNo++
			if l, ok := v.line(lineNo, raw); ok {
				pending = append(pending, l)
			}
			if len(pending) >= 500 {
				if err := flush(); err != nil {
					if !errors.Is(err, batchstore.ErrNotValidating) && ctx.Err() == nil {
						log.Warn("batch store: cannot store lines", "err", err)
					}
					return
				}
			}
			if len(v.errs) >= maxErrors || v.n > v.maxLines {
				break // enough to say why; the rest need not be read
			}
		}
		if errors.Is(rerr, errLineTooLong) {
			v.addErr(lineNo+1, "invalid_request", "", "the line is longer than twice SOUS_MAX_BODY_BYTES")
			break
		}
		if rerr != nil {
			if !errors.Is(rerr, io.EOF) {
				log.Warn("batch store: cannot read the input file", "err", rerr)
				return
			}
			break
		}
	}
	if err := flush(); err != nil {
		if !errors.Is(err, batchstore.ErrNotValidating) && ctx.Err() == nil {
			log.Warn("batch store: cannot store lines", "err", err)
		}
		return
	}
	if v.n == 0 && len(v.errs) == 0 {
		v.addErr(0, "empty_file", "input_file_id", "the input file holds no requests")
	}
	if len(v.errs) > 0 {
		r.fail(ctx, b, v.errs)
		return
	}
	ok, err := st.Start(ctx, b.ID, v.n, r.s.cfg.Now())
	if err != nil {
		if !errors.Is(err, batchstore.ErrNotValidating) && ctx.Err() == nil {
			log.Warn("batch store: cannot start the batch", "err", err)
		}
		return
	}
	if ok {
		log.Info("batch validated", "requests", v.n, "took", time.Since(start).Round(time.Millisecond))
	}
}

func (r *runner) fail(ctx context.Context, b batchstore.Batch, errs []batchstore.LineError) {
	if ok, err := r.b.Store.Fail(ctx, b.ID, errs, r.s.cfg.Now()); err != nil {
		r.s.log.Warn("batch store: cannot fail the batch", "batch_id", b.ID, "err", err)
	} else if ok {
		r.s.log.Info("batch failed validation", "batch_id", b.ID, "errors", len(errs), "first", errs[0].Code)
	}
}

// validator checks a batch's lines one at a time.
type validator struct {
	s        *Server
	ep       endpoint
	url      string
	models   []string
	deadline time.Time
	seen     map[[16]byte]int // custom_id's hash -> its line
	maxLines int
	n        int
	errs     []batchstore.LineError
}

func (v *validator) addErr(line int, code, param, format string, args ...any) {
	if len(v.errs) < maxErrors {
		v.errs = append(v.errs, batchstore.LineError{Code: code, Param: param, Line: line, Message: fmt.Sprintf(format, args...)})
	}
}

type inputLine struct {
	CustomID *string         `json:"custom_id"`
	Method   string          `json:"method"`
	URL      string          `json:"url"`
	Body     json.RawMessage `json:"body"`
}

// line checks one line of the input file: ok with the line to store.
func (v *validator) line(no int, raw []byte) (batchstore.Line, bool) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 {
		return batchstore.Line{}, false
	}
	var in inputLine
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&in); err != nil {
		v.addErr(no, "invalid_json_line", "", "line %d is not a request object {custom_id, method, url, body}: %v", no, err)
		return batchstore.Line{}, false
	}
	switch {
	case in.CustomID == nil || *in.CustomID == "":
		v.addErr(no, "missing_required_parameter", "custom_id", "line %d has no custom_id", no)
		return batchstore.Line{}, false
	case len(*in.CustomID) > 256 || strings.ContainsRune(*in.CustomID, 0):
		v.addErr(no, "invalid_custom_id", "custom_id", "line %d: custom_id must be at most 256 bytes (this gateway's limit) and hold no NUL", no)
		return batchstore.Line{}, false
	case in.Method != "POST":
		v.addErr(no, "invalid_method", "method", "line %d: method must be POST", no)
		return batchstore.Line{}, false
	case in.URL != v.url:
		v.addErr(no, "mismatched_endpoint", "url", "line %d: url %q is not the batch's endpoint %s", no, truncate(in.URL, 64), v.url)
		return batchstore.Line{}, false
	case len(in.Body) == 0 || in.Body[0] != '{':
		v.addErr(no, "invalid_request", "body", "line %d: body must be a JSON object", no)
		return batchstore.Line{}, false
	}
	customID := *in.CustomID
	sum := sha256.Sum256([]byte(customID))
	var h [16]byte
	copy(h[:], sum[:])
	if first, dup := v.seen[h]; dup {
		v.addErr(no, "duplicate_custom_id", "custom_id", "line %d: custom_id %q is also on line %d; each must be unique in the batch", no, truncate(customID, 64), first)
		return batchstore.Line{}, false
	}
	v.seen[h] = no
	v.n++
	if v.n > v.maxLines {
		if v.n == v.maxLines+1 {
			v.addErr(no, "too_many_requests", "input_file_id", "a batch holds at most %d requests (SOUS_GATEWAY_BATCH_MAX_LINES)", v.maxLines)
		}
		return batchstore.Line{}, false
	}
	var t *translated
	var aerr *apiError
	switch v.ep {
	case epChat:
		t, aerr = translateChat(in.Body)
	case epCompletion:
		t, aerr = translateCompletion(in.Body)
	default:
		t, aerr = translateEmbedding(in.Body)
	}
	if aerr == nil && t.req.Stream {
		aerr = badRequest("stream", "a batch request cannot be streamed: remove \"stream\"")
	}
	if aerr != nil {
		v.lineErr(no, aerr)
		return batchstore.Line{}, false
	}
	if t.req.Model == "" {
		t.req.Model = v.s.cfg.Model
	}
	if !slices.Contains(v.models, t.req.Model) {
		v.lineErr(no, errModelNotFound(t.req.Model))
		return batchstore.Line{}, false
	}
	t.req.ID = customID
	deadline := v.deadline
	t.req.Deadline = &deadline
	msg, _ := json.Marshal(t.req)
	if _, err := wire.DecodeRequest(msg, "application/json", customID, wire.Limits{
		MaxBodyBytes: v.s.cfg.MaxBodyBytes, MaxPromptBytes: v.s.cfg.MaxPromptBytes, MaxNumPredict: v.s.cfg.MaxNumPredict,
		DefaultModel: v.s.cfg.Model, AllowedModels: v.s.cfg.Models,
	}, time.Time{}); err != nil {
		var ie *wire.InputError
		if errors.As(err, &ie) {
			v.lineErr(no, fromInputError(ie, t.req.Model))
		} else {
			v.addErr(no, "invalid_request", "body", "line %d: invalid request", no)
		}
		return batchstore.Line{}, false
	}
	return batchstore.Line{Index: v.n - 1, CustomID: customID, Request: packLine(t.base64, msg)}, true
}

func (v *validator) lineErr(no int, e *apiError) {
	param := e.Param
	if param != "" {
		param = "body." + param
	}
	v.addErr(no, e.Code, param, "line %d: %s", no, e.Message)
}

// batchMetrics are the Batch API's instruments.
type batchMetrics struct {
	published metric.Int64Counter
	results   metric.Int64Counter
}

func newBatchMetrics(m metric.Meter, st *batchstore.Store, log interface {
	Warn(string, ...any)
}) batchMetrics {
	var out batchMetrics
	if m == nil {
		m = noop.NewMeterProvider().Meter("")
	}
	out.published, _ = m.Int64Counter("sous.gateway.batch.published", metric.WithUnit("{request}"),
		metric.WithDescription("batch lines published to the request queue (a line published again after a failover counts again)"))
	out.results, _ = m.Int64Counter("sous.gateway.batch.results", metric.WithUnit("{request}"),
		metric.WithDescription("batch lines' results recorded (a duplicate, after a redelivery, is not)"))
	_, _ = m.Int64ObservableGauge("sous.gateway.batches", metric.WithUnit("{batch}"),
		metric.WithDescription("batches in the store, by status"),
		metric.WithInt64Callback(func(ctx context.Context, o metric.Int64Observer) error {
			counts, err := st.CountByStatus(ctx)
			if err != nil {
				log.Warn("batch store: cannot count batches", "err", err)
				return nil
			}
			for _, s := range []batchstore.Status{batchstore.Validating, batchstore.Failed, batchstore.InProgress, batchstore.Finalizing,
				batchstore.Completed, batchstore.Expired, batchstore.Cancelling, batchstore.Cancelled} {
				o.Observe(int64(counts[s]), metric.WithAttributes(attribute.String("sous.batch.status", string(s))))
			}
			return nil
		}))
	return out
}

func (m batchMetrics) recorded(n int) {
	m.results.Add(context.Background(), int64(n))
}
