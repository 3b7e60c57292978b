package main

// sousctl batch: a client of the gateway's OpenAI Batch API (/v1/files and
// /v1/batches) over plain net/http. It talks to the gateway, not to the
// broker: the gateway stores the file, publishes its lines to the bulk lane
// and writes the output and error files.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"mime/multipart"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/sous-run/sous/internal/secret"
)

const batchUsage = `usage: sousctl batch create -f FILE [-endpoint E] [-window 24h] [-metadata k=v ...] [-wait [-o OUT] [-errors ERR]]
       sousctl batch watch ID [-every 2s] [-o OUT] [-errors ERR]
       sousctl batch get ID
       sousctl batch list [-limit N] [-after ID] [-json]
       sousctl batch cancel ID
       sousctl batch download ID -o OUT [-errors ERR]

Runs OpenAI Batch API jobs through the sous gateway (docs/batch.md).

  create    upload FILE (JSON lines: {"custom_id", "method": "POST", "url",
            "body"}) with purpose "batch", create a batch of it and print
            the batch id; with -wait, watch it as watch does and download
            its files at the end
  watch     poll the batch every -every until it is completed, failed,
            expired or cancelled; a progress bar on stderr when that is a
            terminal ("done" counts every finished line, failed ones
            included), else a line per change of status and every 10s;
            then download the files asked for with -o and -errors
  get       print the batch object as JSON
  list      the batches of this key, newest first
  cancel    ask the gateway to cancel the batch (status cancelling, then
            cancelled); lines already queued still run and are kept
  download  write the batch's output file to -o and its error file to
            -errors (either may be left out, not both)

The gateway is -url, else $SOUS_GATEWAY_URL, else http://localhost:8081;
the API key -key, else $SOUS_API_KEY, else $OPENAI_API_KEY (never shown).

Exit code: 0 done (watch and -wait: the batch completed), 1 a request
failed or the batch ended failed, expired or cancelled, 2 a usage error,
130 interrupted (the batch goes on in the gateway).

Flags:
`

// defaultGatewayURL is where `make run-gateway` listens (SOUS_GATEWAY_ADDR).
const defaultGatewayURL = "http://localhost:8081"

// plainEvery is how often watch prints a line without a terminal while
// the status stays the same.
const plainEvery = 10 * time.Second

// batchOptions are the flags of sousctl batch.
type batchOptions struct {
	url      string
	key      secret.Value
	file     string
	endpoint string
	window   string
	metadata map[string]string
	wait     bool
	out      string
	errOut   string
	every    time.Duration
	limit    int
	after    string
	jsonOut  bool
}

func newBatchFlagSet(sub string, o *batchOptions) *flag.FlagSet {
	fs := flag.NewFlagSet("batch "+sub, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.StringVar(&o.url, "url", "", "gateway base URL (default $SOUS_GATEWAY_URL, else "+defaultGatewayURL+")")
	fs.Func("key", "API key (default $SOUS_API_KEY, else $OPENAI_API_KEY)", func(s string) error {
		o.key = secret.Value(s)
		return nil
	})
	files := sub == "create" || sub == "watch" || sub == "download" || sub == "help"
	if sub == "create" || sub == "help" {
		fs.StringVar(&o.file, "f", "", "create: the JSON lines file to upload (required)")
		fs.StringVar(&o.endpoint, "endpoint", "/v1/chat/completions", "create: /v1/chat/completions, /v1/completions or /v1/embeddings")
		fs.StringVar(&o.window, "window", "24h", "create: completion window; the lines' deadline is the batch's created_at plus this")
		fs.Func("metadata", "create: k=v to keep on the batch (repeatable)", func(s string) error {
			k, v, ok := strings.Cut(s, "=")
			if !ok || k == "" {
				return errors.New("want k=v, e.g. project=eval")
			}
			if o.metadata == nil {
				o.metadata = map[string]string{}
			}
			o.metadata[k] = v
			return nil
		})
		fs.BoolVar(&o.wait, "wait", false, "create: watch the batch to its end and download its files (-o, -errors)")
	}
	if files {
		fs.StringVar(&o.out, "o", "", "write the output file (the lines that ran) here")
		fs.StringVar(&o.errOut, "errors", "", "write the error file (the lines that failed) here")
	}
	if sub == "create" || sub == "watch" || sub == "help" {
		fs.DurationVar(&o.every, "every", 2*time.Second, "create -wait, watch: how often to read the batch")
	}
	if sub == "list" || sub == "help" {
		fs.IntVar(&o.limit, "limit", 20, "list: at most this many batches (1 to 100)")
		fs.StringVar(&o.after, "after", "", "list: the batches after this id (the last of the previous page)")
		fs.BoolVar(&o.jsonOut, "json", false, "list: print the gateway's JSON")
	}
	return fs
}

// batchArgs parses flags wherever they are among the arguments, as
// parseArgs does for prompts.
func batchArgs(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if name, ok := strings.CutPrefix(err.Error(), "flag provided but not defined: "); ok {
				return nil, fmt.Errorf("unknown flag %s", name)
			}
			return nil, err
		}
		args = fs.Args()
		if len(args) == 0 {
			return pos, nil
		}
		pos, args = append(pos, args[0]), args[1:]
	}
}

func batch(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "-help" || args[0] == "--help" || args[0] == "help" {
		w, code := stderr, 2
		if len(args) > 0 {
			w, code = stdout, 0
		}
		fmt.Fprint(w, batchUsage)
		fs := newBatchFlagSet("help", &batchOptions{})
		fs.SetOutput(w)
		fs.PrintDefaults()
		return code
	}
	sub := args[0]
	switch sub {
	case "create", "watch", "get", "list", "cancel", "download":
	default:
		fmt.Fprintf(stderr, "sousctl batch: unknown command %q: use create, watch, get, list, cancel or download (sousctl batch -h)\n", sub)
		return 2
	}
	var o batchOptions
	fs := newBatchFlagSet(sub, &o)
	pos, err := batchArgs(fs, args[1:])
	if errors.Is(err, flag.ErrHelp) {
		return batch(ctx, []string{"-h"}, stdout, stderr)
	}
	if err == nil {
		err = o.check(sub, pos)
	}
	if err != nil {
		fmt.Fprintf(stderr, "sousctl batch %s: %v\nRun \"sousctl batch -h\" for the flags.\n", sub, err)
		return 2
	}
	c := newGatewayClient(o.url, o.key)
	defer c.hc.CloseIdleConnections()
	var id string
	if len(pos) > 0 {
		id = pos[0]
	}
	code := 0
	switch sub {
	case "create":
		code, err = batchCreate(ctx, c, o, stdout, stderr)
	case "watch":
		code, err = batchWatchDownload(ctx, c, o, id, stderr)
	case "get":
		err = batchGet(ctx, c, id, stdout)
	case "list":
		err = batchList(ctx, c, o, stdout)
	case "cancel":
		err = batchCancel(ctx, c, id, stdout)
	case "download":
		var b batchObject
		if b, _, err = c.batch(ctx, id); err == nil {
			err = download(ctx, c, b, o, stderr, true)
		}
	}
	if err != nil {
		if ctx.Err() != nil {
			fmt.Fprintf(stderr, "sousctl batch %s: interrupted\n", sub)
			return 130
		}
		fmt.Fprintf(stderr, "sousctl batch %s: %s\n", sub, secret.Scrub(err.Error(), o.key))
		return 1
	}
	return code
}

// check completes o from the environment and refuses what cannot work.
func (o *batchOptions) check(sub string, pos []string) error {
	if o.url == "" {
		o.url = envOr("SOUS_GATEWAY_URL", defaultGatewayURL)
	}
	if o.key.IsZero() {
		o.key = secret.Value(os.Getenv("SOUS_API_KEY"))
	}
	if o.key.IsZero() {
		o.key = secret.Value(os.Getenv("OPENAI_API_KEY"))
	}
	u, err := url.Parse(o.url)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return errors.New("-url (or SOUS_GATEWAY_URL) must be the gateway's http:// or https:// address, such as " + defaultGatewayURL)
	}
	takesID := sub != "create" && sub != "list"
	switch {
	case takesID && len(pos) != 1:
		return fmt.Errorf("give one batch id (sousctl batch list lists them)")
	case !takesID && len(pos) > 0:
		return fmt.Errorf("unexpected argument %q", pos[0])
	case sub == "create" && o.file == "":
		return errors.New("give the requests file with -f FILE")
	case sub == "create" && !o.wait && (o.out != "" || o.errOut != ""):
		return errors.New("-o and -errors need -wait (or use sousctl batch download later)")
	case sub == "download" && o.out == "" && o.errOut == "":
		return errors.New("give -o FILE, -errors FILE or both")
	case (sub == "create" || sub == "watch") && o.every <= 0:
		return errors.New("-every must be more than 0")
	case sub == "list" && (o.limit < 1 || o.limit > 100):
		return errors.New("-limit must be 1 to 100")
	case o.out != "" && o.out == o.errOut:
		return errors.New("-o and -errors name the same file")
	}
	return nil
}

// batchObject is what sousctl reads of OpenAI's batch object; get prints
// the gateway's JSON as it came.
type batchObject struct {
	ID            string `json:"id"`
	Status        string `json:"status"`
	Endpoint      string `json:"endpoint"`
	InputFileID   string `json:"input_file_id"`
	OutputFileID  string `json:"output_file_id"`
	ErrorFileID   string `json:"error_file_id"`
	CreatedAt     int64  `json:"created_at"`
	RequestCounts struct {
		Total     int `json:"total"`
		Completed int `json:"completed"`
		Failed    int `json:"failed"`
	} `json:"request_counts"`
	Errors *struct {
		Data []struct {
			Code    string `json:"code"`
			Message string `json:"message"`
			Param   string `json:"param"`
			Line    *int   `json:"line"`
		} `json:"data"`
	} `json:"errors"`
}

func (b batchObject) terminal() bool {
	switch b.Status {
	case "completed", "failed", "expired", "cancelled":
		return true
	}
	return false
}

// gatewayClient calls the gateway's API. Safe for concurrent use.
type gatewayClient struct {
	base string // scheme://host[:port][/prefix], without /v1
	key  secret.Value
	hc   *http.Client
}

func newGatewayClient(base string, key secret.Value) *gatewayClient {
	base = strings.TrimSuffix(strings.TrimSuffix(base, "/"), "/v1")
	// No overall timeout: an upload or a download of 200 MB takes what it
	// takes. Each phase that can hang on a dead gateway is bounded.
	tr := &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		DialContext:           (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		TLSHandshakeTimeout:   10 * time.Second,
		ResponseHeaderTimeout: 2 * time.Minute, // counted after the upload's last byte: validation may read it all
		IdleConnTimeout:       90 * time.Second,
		MaxIdleConnsPerHost:   2,
	}
	return &gatewayClient{base: base, key: key, hc: &http.Client{Transport: tr}}
}

// apiError is an error answer of the gateway, OpenAI-shaped.
type apiError struct {
	Status  int
	Message string
	Type    string
	Code    string
}

func (e *apiError) Error() string {
	s := fmt.Sprintf("gateway answered %d %s", e.Status, http.StatusText(e.Status))
	if e.Message != "" {
		s += ": " + e.Message
	}
	if e.Code != "" {
		s += " (" + e.Code + ")"
	}
	return s
}

// retryable reports whether asking again later may work.
func (e *apiError) retryable() bool {
	return e.Status == http.StatusTooManyRequests || e.Status >= 500
}

// do sends a request with the key and returns the response of a 2xx
// answer, whose body the caller closes; any other answer is an *apiError.
func (c *gatewayClient) do(ctx context.Context, method, path string, body io.Reader, contentType string) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, body)
	if err != nil {
		return nil, err
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	if !c.key.IsZero() {
		req.Header.Set("Authorization", "Bearer "+c.key.Reveal())
	}
	req.Header.Set("User-Agent", "sousctl")
	resp, err := c.hc.Do(req)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode/100 == 2 {
		return resp, nil
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	e := &apiError{Status: resp.StatusCode}
	var env struct {
		Error struct {
			Message string `json:"message"`
			Type    string `json:"type"`
			Code    any    `json:"code"`
		} `json:"error"`
	}
	if json.Unmarshal(b, &env) == nil && env.Error.Message != "" {
		e.Message, e.Type = env.Error.Message, env.Error.Type
		if env.Error.Code != nil {
			e.Code = fmt.Sprint(env.Error.Code)
		}
	} else {
		e.Message = strings.TrimSpace(string(b))
		if len(e.Message) > 200 {
			e.Message = e.Message[:200] + "…"
		}
	}
	return nil, e
}

// json sends in (unless nil) as JSON and returns the answer's body.
func (c *gatewayClient) json(ctx context.Context, method, path string, in any) ([]byte, error) {
	var body io.Reader
	ct := ""
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return nil, err
		}
		body, ct = bytes.NewReader(b), "application/json"
	}
	resp, err := c.do(ctx, method, path, body, ct)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	return io.ReadAll(io.LimitReader(resp.Body, 16<<20))
}

// batch reads a batch and also returns its JSON as the gateway sent it.
func (c *gatewayClient) batch(ctx context.Context, id string) (batchObject, []byte, error) {
	raw, err := c.json(ctx, http.MethodGet, "/v1/batches/"+url.PathEscape(id), nil)
	if err != nil {
		return batchObject{}, nil, err
	}
	var b batchObject
	if err := json.Unmarshal(raw, &b); err != nil {
		return b, nil, fmt.Errorf("batch %s: the answer is not a batch object: %w", id, err)
	}
	return b, raw, nil
}

// upload sends the file at path to POST /v1/files with purpose batch. The
// multipart body is written through a pipe as the transport reads it, so
// that a 200 MB file is never held in memory.
func (c *gatewayClient) upload(ctx context.Context, path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	pr, pw := io.Pipe()
	mw := multipart.NewWriter(pw)
	done := make(chan struct{})
	go func() {
		defer close(done)
		err := mw.WriteField("purpose", "batch")
		if err == nil {
			var part io.Writer
			if part, err = mw.CreateFormFile("file", filepath.Base(path)); err == nil {
				if _, err = io.Copy(part, f); err == nil {
					err = mw.Close()
				}
			}
		}
		pw.CloseWithError(err) // nil: EOF for the reader
	}()
	// The transport may stop reading early (an error answer before the
	// whole body): closing the reader ends the writer, which is waited for.
	defer func() { pr.Close(); <-done }()
	resp, err := c.do(ctx, http.MethodPost, "/v1/files", pr, mw.FormDataContentType())
	if err != nil {
		return "", fmt.Errorf("upload %s: %w", path, err)
	}
	defer resp.Body.Close()
	var file struct {
		ID string `json:"id"`
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&file); err != nil || file.ID == "" {
		return "", fmt.Errorf("upload %s: the answer has no file id (%v)", path, err)
	}
	return file.ID, nil
}

func batchCreate(ctx context.Context, c *gatewayClient, o batchOptions, stdout, stderr io.Writer) (int, error) {
	fileID, err := c.upload(ctx, o.file)
	if err != nil {
		return 1, err
	}
	req := map[string]any{"input_file_id": fileID, "endpoint": o.endpoint, "completion_window": o.window}
	if len(o.metadata) > 0 {
		req["metadata"] = o.metadata
	}
	raw, err := c.json(ctx, http.MethodPost, "/v1/batches", req)
	var b batchObject
	if err == nil {
		if err = json.Unmarshal(raw, &b); err == nil && b.ID == "" {
			err = errors.New("the answer has no batch id")
		}
	}
	if err != nil {
		// The uploaded file is of no use without its batch: remove it, on
		// a context of its own so that an interrupt still cleans up.
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		if _, derr := c.json(dctx, http.MethodDelete, "/v1/files/"+url.PathEscape(fileID), nil); derr != nil {
			fmt.Fprintf(stderr, "sousctl batch create: uploaded file %s not deleted: %s\n", fileID, secret.Scrub(derr.Error(), c.key))
		}
		return 1, fmt.Errorf("create the batch of %s: %w", o.file, err)
	}
	fmt.Fprintln(stdout, b.ID)
	if !o.wait {
		return 0, nil
	}
	return batchWatchDownload(ctx, c, o, b.ID, stderr)
}

// batchWatchDownload watches the batch to its end, downloads the files
// asked for and returns exit code 0 if it completed, else 1.
func batchWatchDownload(ctx context.Context, c *gatewayClient, o batchOptions, id string, stderr io.Writer) (int, error) {
	w := &watcher{c: c, every: o.every, out: stderr, tty: isTerminal(stderr), now: time.Now}
	b, err := w.watch(ctx, id)
	if err != nil {
		if ctx.Err() != nil {
			fmt.Fprintf(stderr, "sousctl: the batch goes on in the gateway; sousctl batch watch %s\n", id)
		}
		return 1, err
	}
	printEnd(stderr, b)
	if err := download(ctx, c, b, o, stderr, false); err != nil {
		return 1, err
	}
	if b.Status != "completed" {
		return 1, nil
	}
	return 0, nil
}

// printEnd says how the batch ended and, for a failed one, why.
func printEnd(w io.Writer, b batchObject) {
	n := b.RequestCounts
	fmt.Fprintf(w, "%s %s: %d of %d lines completed, %d failed\n", b.ID, b.Status, n.Completed, n.Total, n.Failed)
	if b.Errors == nil {
		return
	}
	for _, e := range b.Errors.Data {
		s := "  "
		if e.Line != nil {
			s += fmt.Sprintf("line %d: ", *e.Line)
		}
		s += e.Code + ": " + e.Message
		if e.Param != "" {
			s += " (" + e.Param + ")"
		}
		fmt.Fprintln(w, s)
	}
}

// watcher polls one batch and draws its progress. now is the clock of
// the rate, the ETA and the plain mode's repeat.
type watcher struct {
	c     *gatewayClient
	every time.Duration
	out   io.Writer
	tty   bool
	now   func() time.Time

	startAt   time.Time
	startDone int
	lastLine  time.Time
	lastState string
}

// maxPollFailures is how many polls in a row may fail with an error that
// may pass (a gateway restarting, a 503) before watch gives up.
const maxPollFailures = 10

func (w *watcher) watch(ctx context.Context, id string) (batchObject, error) {
	t := time.NewTimer(0)
	defer t.Stop()
	failures := 0
	for {
		select {
		case <-ctx.Done():
			w.endLine()
			return batchObject{}, ctx.Err()
		case <-t.C:
		}
		b, _, err := w.c.batch(ctx, id)
		if err != nil {
			var ae *apiError
			if ctx.Err() != nil || (errors.As(err, &ae) && !ae.retryable()) || failures+1 >= maxPollFailures {
				w.endLine()
				return b, err
			}
			failures++
			t.Reset(w.every)
			continue
		}
		failures = 0
		w.draw(b)
		if b.terminal() {
			w.endLine()
			return b, nil
		}
		t.Reset(w.every)
	}
}

// draw shows b: on a terminal the bar, rewritten in place; else a line
// when the status changed or plainEvery passed.
func (w *watcher) draw(b batchObject) {
	now := w.now()
	n := b.RequestCounts
	done := n.Completed + n.Failed
	if w.startAt.IsZero() {
		w.startAt, w.startDone = now, done
	}
	progress := fmt.Sprintf("%d/%d done, %d failed, %s", done, n.Total, n.Failed, b.Status)
	if el := now.Sub(w.startAt); el > 0 && done > w.startDone {
		rate := float64(done-w.startDone) / el.Seconds()
		progress += fmt.Sprintf(", %.0f/s", rate)
		if left := n.Total - done; left > 0 && !b.terminal() {
			progress += ", ETA " + time.Duration(float64(left)/rate*float64(time.Second)).Round(time.Second).String()
		}
	}
	if w.tty {
		const width = 30
		fill := 0
		if n.Total > 0 {
			fill = min(width, done*width/n.Total)
		}
		fmt.Fprintf(w.out, "\r[%s%s] %s\x1b[K", strings.Repeat("#", fill), strings.Repeat(".", width-fill), progress)
		w.lastState = b.Status
		return
	}
	if b.Status != w.lastState || now.Sub(w.lastLine) >= plainEvery {
		fmt.Fprintf(w.out, "%s %s\n", b.ID, progress)
		w.lastState, w.lastLine = b.Status, now
	}
}

// endLine ends the bar's line so that what follows starts on its own.
func (w *watcher) endLine() {
	if w.tty && w.lastState != "" {
		fmt.Fprintln(w.out)
	}
}

// download writes b's output file to o.out and its error file to
// o.errOut, where given, and names on stderr those not asked for. A file
// asked for that the batch does not have is said on stderr; with strict
// (sousctl batch download) it is an error.
func download(ctx context.Context, c *gatewayClient, b batchObject, o batchOptions, stderr io.Writer, strict bool) error {
	for _, f := range []struct{ id, path, what, flag string }{
		{b.OutputFileID, o.out, "output", "-o"},
		{b.ErrorFileID, o.errOut, "error", "-errors"},
	} {
		switch {
		case f.path == "":
			if f.id != "" {
				fmt.Fprintf(stderr, "%s has an %s file, %s: sousctl batch download %s %s FILE\n", b.ID, f.what, f.id, b.ID, f.flag)
			}
		case f.id == "" && strict:
			return fmt.Errorf("batch %s (%s) has no %s file", b.ID, b.Status, f.what)
		case f.id == "":
			fmt.Fprintf(stderr, "%s has no %s file; %s not written\n", b.ID, f.what, f.path)
		default:
			n, err := c.save(ctx, f.id, f.path)
			if err != nil {
				return fmt.Errorf("%s file %s: %w", f.what, f.id, err)
			}
			fmt.Fprintf(stderr, "wrote the %s file (%d bytes) to %s\n", f.what, n, f.path)
		}
	}
	return nil
}

// save streams the content of file id to path: into a temporary file
// beside it, renamed into place once complete, so that an interrupted
// download never looks like a whole one.
func (c *gatewayClient) save(ctx context.Context, id, path string) (int64, error) {
	resp, err := c.do(ctx, http.MethodGet, "/v1/files/"+url.PathEscape(id)+"/content", nil, "")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return 0, err
	}
	n, err := io.Copy(tmp, resp.Body)
	if err == nil && resp.ContentLength >= 0 && n != resp.ContentLength {
		err = fmt.Errorf("got %d of %d bytes", n, resp.ContentLength)
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		os.Remove(tmp.Name())
		return n, err
	}
	return n, nil
}

func batchGet(ctx context.Context, c *gatewayClient, id string, stdout io.Writer) error {
	_, raw, err := c.batch(ctx, id)
	if err != nil {
		return err
	}
	return printIndented(stdout, raw)
}

// printIndented prints raw indented, as the gateway sent it otherwise.
func printIndented(w io.Writer, raw []byte) error {
	var buf bytes.Buffer
	if err := json.Indent(&buf, raw, "", "  "); err != nil {
		return fmt.Errorf("the answer is not JSON: %w", err)
	}
	buf.WriteByte('\n')
	_, err := w.Write(buf.Bytes())
	return err
}

func batchList(ctx context.Context, c *gatewayClient, o batchOptions, stdout io.Writer) error {
	q := url.Values{"limit": {strconv.Itoa(o.limit)}}
	if o.after != "" {
		q.Set("after", o.after)
	}
	raw, err := c.json(ctx, http.MethodGet, "/v1/batches?"+q.Encode(), nil)
	if err != nil {
		return err
	}
	if o.jsonOut {
		return printIndented(stdout, raw)
	}
	var page struct {
		Data    []batchObject `json:"data"`
		HasMore bool          `json:"has_more"`
	}
	if err := json.Unmarshal(raw, &page); err != nil {
		return fmt.Errorf("the answer is not a list of batches: %w", err)
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tSTATUS\tENDPOINT\tDONE\tFAILED\tCREATED")
	for _, b := range page.Data {
		n := b.RequestCounts
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d/%d\t%d\t%s\n", b.ID, b.Status, b.Endpoint, n.Completed+n.Failed, n.Total, n.Failed,
			time.Unix(b.CreatedAt, 0).UTC().Format(time.RFC3339))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if page.HasMore && len(page.Data) > 0 {
		fmt.Fprintf(stdout, "more: sousctl batch list -after %s\n", page.Data[len(page.Data)-1].ID)
	}
	return nil
}

func batchCancel(ctx context.Context, c *gatewayClient, id string, stdout io.Writer) error {
	raw, err := c.json(ctx, http.MethodPost, "/v1/batches/"+url.PathEscape(id)+"/cancel", nil)
	if err != nil {
		return err
	}
	var b batchObject
	if err := json.Unmarshal(raw, &b); err != nil {
		return fmt.Errorf("the answer is not a batch object: %w", err)
	}
	fmt.Fprintf(stdout, "%s %s\n", b.ID, b.Status)
	return nil
}
