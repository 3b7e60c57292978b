package gateway

import (
	"io"
	"net/http"
	"path"
	"sync/atomic"
	"time"
)

// Every phase of a connection is bounded. The http.Server bounds the
// headers (ReadHeaderTimeout) and the idle time between requests
// (IdleTimeout); ServeHTTP bounds the rest:
//
//   - the body: a read deadline of Config.BodyTimeout from the start of
//     the request, cleared once the body has been read to its end (the
//     wait for the answer that follows is bounded by Config.Timeout);
//   - a body the gateway answers without reading (401, 429, 413, 408…):
//     the response closes the connection, and the read deadline is moved
//     to now, so that net/http does not wait, with no deadline, to discard
//     what the client never sends;
//   - each write and flush: a write deadline of Config.WriteTimeout, so a
//     client that stops reading frees its slot, its call and its answer.
//
// No http.Server.ReadTimeout or WriteTimeout: one would end a request
// waiting longer for its answer (net/http's background read cancels the
// request's context at the read deadline; HTTP/2 resets a stream at the
// write deadline).

// trackedBody remembers whether the request body was read to its end.
type trackedBody struct {
	io.ReadCloser
	eof atomic.Bool
}

func (b *trackedBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err == io.EOF {
		b.eof.Store(true)
	}
	return n, err
}

// unread reports whether a body was announced and not read to its end.
func (b *trackedBody) unread() bool { return b != nil && !b.eof.Load() }

// boundedWriter gives each write and flush a write deadline, and closes
// the connection after a response sent before the body was read.
type boundedWriter struct {
	http.ResponseWriter
	rc      *http.ResponseController
	timeout time.Duration
	body    *trackedBody // nil: no body, or HTTP/2 (each stream has its own)
	wrote   bool
}

func (w *boundedWriter) header() {
	if w.wrote {
		return
	}
	w.wrote = true
	if w.body.unread() {
		w.Header().Set("Connection", "close")
	}
}

func (w *boundedWriter) WriteHeader(code int) {
	w.header()
	w.ResponseWriter.WriteHeader(code)
}

func (w *boundedWriter) Write(b []byte) (int, error) {
	w.header()
	_ = w.rc.SetWriteDeadline(time.Now().Add(w.timeout))
	return w.ResponseWriter.Write(b)
}

// FlushError is what http.ResponseController.Flush calls.
func (w *boundedWriter) FlushError() error {
	w.header()
	_ = w.rc.SetWriteDeadline(time.Now().Add(w.timeout))
	return w.rc.Flush()
}

// Unwrap lets http.ResponseController reach the deadlines.
func (w *boundedWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// ServeHTTP bounds the request's phases (see above) and routes it.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	rc := http.NewResponseController(w)
	var body *trackedBody
	if r.Body != nil && r.Body != http.NoBody {
		_ = rc.SetReadDeadline(time.Now().Add(s.cfg.BodyTimeout))
		if r.ProtoMajor == 1 {
			// Only HTTP/1 holds the connection to discard an unread
			// body; HTTP/2 resets the stream, and Connection: close
			// would shut down every stream of the connection.
			body = &trackedBody{ReadCloser: r.Body}
			r.Body = body
		}
	}
	// "//v1/models" is "/v1/models" (a base URL with a trailing slash):
	// served, not redirected with an HTML body as http.ServeMux would.
	if p := cleanPath(r.URL.Path); p != r.URL.Path {
		r.URL.Path, r.URL.RawPath = p, ""
	}
	bw := &boundedWriter{ResponseWriter: w, rc: rc, timeout: s.cfg.WriteTimeout, body: body}
	s.mux.ServeHTTP(bw, r)
	if body.unread() {
		// net/http reads up to 256 KiB of an unread body after the
		// handler; the connection closes anyway (Connection: close).
		_ = rc.SetReadDeadline(time.Now())
	}
	if r.ProtoMajor == 1 {
		// For what net/http flushes after the handler.
		_ = rc.SetWriteDeadline(time.Now().Add(s.cfg.WriteTimeout))
	}
}

// cleanPath is p without repeated slashes, "." and "..".
func cleanPath(p string) string {
	if p == "" {
		return "/"
	}
	c := path.Clean("/" + p)
	if len(p) > 1 && p[len(p)-1] == '/' && c != "/" {
		c += "/"
	}
	return c
}
