package gateway

import (
	"bufio"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/sous-run/sous/internal/inference"
	"github.com/sous-run/sous/internal/wire"
)

// waitUntil polls cond until it holds, failing the test after within
// (generous: these tests assert that something happens, not how fast).
func waitUntil(t *testing.T, within time.Duration, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(within); !cond(); {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s", what, within)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// rawRequest sends head (and body, if any) on a new connection and
// returns it with a reader of what comes back.
func rawRequest(t *testing.T, addr, head, body string) (net.Conn, *bufio.Reader) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if _, err := io.WriteString(c, head+body); err != nil {
		t.Fatal(err)
	}
	return c, bufio.NewReader(c)
}

// readResponse reads one response, failing after within.
func readResponse(t *testing.T, c net.Conn, r *bufio.Reader, within time.Duration) (*http.Response, string) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(within))
	resp, err := http.ReadResponse(r, nil)
	if err != nil {
		t.Fatalf("no response within %s: %v", within, err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	return resp, string(b)
}

// closedByServer reports whether the server closed c (EOF or a reset)
// within within; a read timeout means it still holds it.
func closedByServer(c net.Conn, r *bufio.Reader, within time.Duration) bool {
	_ = c.SetReadDeadline(time.Now().Add(within))
	_, err := r.ReadByte()
	var ne net.Error
	return err != nil && !(errorAs(err, &ne) && ne.Timeout())
}

func errorAs(err error, ne *net.Error) bool {
	e, ok := err.(net.Error)
	if ok {
		*ne = e
	}
	return ok
}

// Item 6 of the hardening issue: a request that announces a body it never
// sends, answered without reading it (401), must be answered and its
// connection closed, not held while net/http waits to discard the body.
func TestUnreadBodyIsAnsweredAndClosed(t *testing.T) {
	t.Parallel()
	srv, _ := setup(t, setupOpts{keys: keyLine("alice", testKey, "")})
	for _, tt := range []struct{ name, auth string }{
		{"no key", ""},
		{"wrong key", "Authorization: Bearer nope\r\n"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			head := "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + tt.auth +
				"Content-Length: 1000\r\n\r\n"
			c, r := rawRequest(t, srv.Listener.Addr().String(), head, `{"messages":`)
			resp, _ := readResponse(t, c, r, 20*time.Second)
			if resp.StatusCode != 401 {
				t.Fatalf("status %d, want 401", resp.StatusCode)
			}
			if !resp.Close {
				t.Error("a response to an unread body does not say Connection: close")
			}
			if !closedByServer(c, r, 20*time.Second) {
				t.Fatal("the connection is still open 20s after the answer")
			}
		})
	}
}

// Items 6 and 12: a body that does not arrive within the body timeout is
// a 408 (not a 400) whose message names no socket address, and the
// connection is closed.
func TestSlowBodyIs408(t *testing.T) {
	t.Parallel()
	srv, b := setup(t, setupOpts{keys: keyLine("alice", testKey, ""), cfg: func(c *Config) { c.BodyTimeout = 300 * time.Millisecond }})
	head := "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer " + testKey +
		"\r\nContent-Length: 100\r\n\r\n"
	c, r := rawRequest(t, srv.Listener.Addr().String(), head, `{"messages":`)
	resp, body := readResponse(t, c, r, 60*time.Second)
	if resp.StatusCode != 408 {
		t.Fatalf("status %d, want 408: %s", resp.StatusCode, body)
	}
	var e errorBody
	if err := json.Unmarshal([]byte(body), &e); err != nil || e.Error.Message == "" {
		t.Fatalf("not an OpenAI error: %s", body)
	}
	host, _, _ := net.SplitHostPort(c.LocalAddr().String())
	if strings.Contains(body, host) || strings.Contains(body, srv.Listener.Addr().String()) {
		t.Fatalf("the error names a socket address: %s", body)
	}
	if !closedByServer(c, r, 20*time.Second) {
		t.Fatal("the connection is still open 20s after the 408")
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.sent) != 0 {
		t.Fatal("a request whose body never came was published")
	}
}

// Item 7: a client that stops reading its answer frees its slot (MaxOpen)
// and its call within the write timeout, for a JSON answer and a stream.
func TestStuckReaderFreesItsSlot(t *testing.T) {
	t.Parallel()
	// 2M floats: about 20 MB of JSON, more than loopback's socket buffers.
	big := make([]float32, 2<<20)
	for i := range big {
		big[i] = 0.123456
	}
	for _, tt := range []struct {
		name, path, body string
		answer           func(Message, *fakeCall)
	}{
		{"json", "/v1/embeddings", `{"input":"x"}`, func(m Message, c *fakeCall) {
			c.push(false, wire.Result{ID: m.ID, Status: wire.StatusOK, Embeddings: [][]float32{big}, Usage: &inference.Usage{InputTokens: 1}})
		}},
		{"stream", "/v1/chat/completions", `{"messages":[{"role":"user","content":"hi"}],"stream":true}`, func(m Message, c *fakeCall) {
			part := strings.Repeat("word ", 1<<14) // 80 KiB a chunk
			for i := range 200 {
				if c.isClosed() {
					return
				}
				c.push(true, wire.Chunk{ID: m.ID, Seq: i, Delta: part, Attempt: 1})
			}
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			srv, b := setup(t, setupOpts{answer: tt.answer, cfg: func(c *Config) {
				c.MaxOpen = 1
				c.Timeout = 10 * time.Minute // only the write deadline may free it
				c.WriteTimeout = 500 * time.Millisecond
			}})
			head := "POST " + tt.path + " HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: " +
				itoa(len(tt.body)) + "\r\n\r\n"
			c, err := net.Dial("tcp", srv.Listener.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			_ = c.(*net.TCPConn).SetReadBuffer(4096)
			if _, err := io.WriteString(c, head+tt.body); err != nil {
				t.Fatal(err)
			}
			// Never read: the answer cannot all be written.
			start := time.Now()
			waitUntil(t, 60*time.Second, "the stuck request's call closed", func() bool {
				b.mu.Lock()
				defer b.mu.Unlock()
				return len(b.calls) == 1 && b.calls[0].isClosed()
			})
			t.Logf("FIGURE stuck_reader_freed_s=%.1f (write timeout 0.5s)", time.Since(start).Seconds())
			// The slot is free: another request is served, not refused.
			resp := post(t, srv.URL+"/v1/models", "", "")
			resp.Body.Close()
			req, _ := http.NewRequest(http.MethodPost, srv.URL+tt.path, strings.NewReader(tt.body))
			second, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer second.Body.Close()
			if second.StatusCode == 429 {
				t.Fatal("the stuck request still holds its slot")
			}
		})
	}
}

func itoa(n int) string { b, _ := json.Marshal(n); return string(b) }

// Item 9: until it is published a request holds its body several times
// over, so only MaxIntake requests read, decode and publish at once; the
// others wait (their bodies stay in the kernel's buffers).
func TestIntakeIsBounded(t *testing.T) {
	t.Parallel()
	srv, b := setup(t, setupOpts{answer: okAnswer("hi"), cfg: func(c *Config) { c.MaxIntake = 1; c.BodyTimeout = time.Minute }})
	sent := func() int { b.mu.Lock(); defer b.mu.Unlock(); return len(b.sent) }
	body := `{"prompt":"hi"}`
	head := "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: " + itoa(len(body)) + "\r\n\r\n"
	// The first holds the intake: its body comes in two parts.
	c, r := rawRequest(t, srv.Listener.Addr().String(), head, body[:5])
	done := make(chan int, 1)
	go func() {
		time.Sleep(100 * time.Millisecond) // let the first take the intake
		req, _ := http.NewRequest(http.MethodPost, srv.URL+"/v1/completions", strings.NewReader(body))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			done <- 0
			return
		}
		resp.Body.Close()
		done <- resp.StatusCode
	}()
	time.Sleep(500 * time.Millisecond)
	if n := sent(); n != 0 {
		t.Fatalf("%d published while the only intake slot was held by a body still arriving", n)
	}
	if _, err := io.WriteString(c, body[5:]); err != nil {
		t.Fatal(err)
	}
	if resp, _ := readResponse(t, c, r, 30*time.Second); resp.StatusCode != 200 {
		t.Fatalf("first: %d", resp.StatusCode)
	}
	if s := <-done; s != 200 {
		t.Fatalf("second: %d", s)
	}
}
