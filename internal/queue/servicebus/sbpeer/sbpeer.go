// Package sbpeer runs peer.py, an AMQP 1.0 protocol test double for the
// Azure Service Bus Go SDK, so that tests drive the real azservicebus client
// code end to end on a machine without Azure or Docker.
//
// It is NOT a Service Bus emulator. It is written on an established AMQP 1.0
// library, Qpid Proton's Python binding (Debian's python3-qpid-proton, run
// with /usr/bin/python3; install.sh installs it), and answers only what the
// SDK needs for sous's driver: SASL ANONYMOUS, $cbs put-token, queue sender
// and PeekLock receiver links (16-byte delivery tags, x-opt-lock-token,
// x-opt-enqueued-time, x-opt-sequence-number, x-opt-locked-until),
// accepted / modified / rejected / released dispositions, lock expiry,
// ReceiveAndDelete (presettled) receivers, named sessions on queues marked
// session-enabled (com.microsoft:session-filter, one lock per session,
// renew-session-lock), a per-queue message cap that rejects sends with
// amqp:resource-limit-exceeded, and the "<queue>/$management" operations
// renew-lock, update-disposition and peek-message. peer.py's doc string
// lists what it leaves out.
//
// The peer reports what happens as JSON events on its stdout, which a Peer
// collects for the test to wait on and inspect; the test steers it with
// commands on its stdin. It listens on a free loopback port (never 5672) and
// exits when its stdin closes, so it never outlives the test.
//
// A Peer is safe for concurrent use by the goroutines of one test.
package sbpeer

import (
	"bufio"
	"bytes"
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

//go:embed peer.py
var script []byte

// Python is the interpreter the peer runs on: Debian's, which is where
// python3-qpid-proton installs the proton package (a pyenv or virtualenv
// python3 on PATH would not see it).
const Python = "/usr/bin/python3"

// InstallScript is the script, relative to the repository root, that
// installs the peer's dependencies.
const InstallScript = "internal/queue/servicebus/sbpeer/install.sh"

// Key is the SharedAccessKey in ConnectionString. The peer accepts any
// token; the key is fake and only there because the SDK requires one.
const Key = "sbpeer-fake-key"

// Event is one line the peer printed. Fields absent from an event are zero.
type Event struct {
	Name string `json:"event"`

	Queue                 string         `json:"queue"`
	Seq                   int64          `json:"seq"`
	MessageID             string         `json:"message_id"`
	CorrelationID         string         `json:"correlation_id"`
	SessionID             string         `json:"session_id"`
	ReplyTo               string         `json:"reply_to"`
	ReplyToSessionID      string         `json:"reply_to_session_id"`
	ContentType           string         `json:"content_type"`
	Body                  any            `json:"body"`      // a string, or a list for an amqp-sequence
	BodyKind              string         `json:"body_kind"` // "data", "value" or "sequence"
	ApplicationProperties map[string]any `json:"application_properties"`

	DeliveryCount int      `json:"delivery_count"`
	LockToken     string   `json:"lock_token"`
	LockTokens    []string `json:"lock_tokens"`
	OK            bool     `json:"ok"`
	Via           string   `json:"via"` // "link" or "management"
	Reason        string   `json:"reason"`
	Description   string   `json:"description"`
	Status        string   `json:"status"`
	Operation     string   `json:"operation"`
	Audience      string   `json:"audience"`
	Address       string   `json:"address"`
	Role          string   `json:"role"` // of the client's link: "sender" or "receiver"
	LinkName      string   `json:"name"`
	Port          int      `json:"port"`
	ID            int64    `json:"id"`
	Error         string   `json:"error"`
	Message       string   `json:"message"`
	Condition     string   `json:"condition"` // of a refused link or a rejected send
	Settled       bool     `json:"settled"`   // a presettled (ReceiveAndDelete) delivery

	// Line is the event as printed, for fields not listed above.
	Line string `json:"-"`
}

func (e Event) String() string { return e.Line }

// Options configures a peer.
type Options struct {
	// LockDuration is how long a delivery stays locked. Zero means 30s.
	LockDuration time.Duration
}

// Peer is a running peer.py.
type Peer struct {
	// Port is the loopback port the peer listens on.
	Port int

	t     testing.TB
	cmd   *exec.Cmd
	stdin io.WriteCloser
	done  chan struct{} // closed when the peer's stdout ends
	wmu   sync.Mutex    // serializes commands

	mu      sync.Mutex
	events  []Event
	changed chan struct{} // closed and replaced on every event
	nextID  int64
	stderr  bytes.Buffer
}

// Start runs a peer for the duration of t. It fails t (it does not skip)
// when /usr/bin/python3 or Qpid Proton's binding is missing, naming the
// install script.
func Start(t testing.TB, opts Options) *Peer {
	t.Helper()
	if out, err := exec.Command(Python, "-c", "import proton").CombinedOutput(); err != nil {
		t.Fatalf("sbpeer: %s cannot import Qpid Proton (%v: %s); run %s (apt-get install -y python3-qpid-proton)",
			Python, err, strings.TrimSpace(string(out)), InstallScript)
	}
	path := filepath.Join(t.TempDir(), "peer.py")
	if err := os.WriteFile(path, script, 0o600); err != nil {
		t.Fatalf("sbpeer: %v", err)
	}
	lock := opts.LockDuration
	if lock <= 0 {
		lock = 30 * time.Second
	}
	var errs []error
	for range 5 {
		p, err := start(t, path, lock)
		if err == nil {
			return p
		}
		errs = append(errs, err)
	}
	t.Fatalf("sbpeer: could not start: %v", errors.Join(errs...))
	return nil
}

// start launches the peer on a free port and waits for it to listen. The
// port can be taken between choosing and binding it; Start then retries.
func start(t testing.TB, path string, lock time.Duration) (*Peer, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	p := &Peer{Port: port, t: t, done: make(chan struct{}), changed: make(chan struct{})}
	p.cmd = exec.Command(Python, path, "--port", fmt.Sprint(port), "--lock-duration-ms", fmt.Sprint(lock.Milliseconds()))
	p.cmd.Stderr = &lockedWriter{mu: &p.mu, w: &p.stderr}
	stdout, err := p.cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if p.stdin, err = p.cmd.StdinPipe(); err != nil {
		return nil, err
	}
	if err := p.cmd.Start(); err != nil {
		return nil, err
	}
	go p.read(stdout)

	if _, err := p.wait(15*time.Second, func(e Event) bool { return e.Name == "listening" }); err != nil {
		p.stop()
		return nil, fmt.Errorf("port %d: %w; stderr: %s", port, err, p.Stderr())
	}
	t.Cleanup(func() {
		p.stop()
		if t.Failed() {
			t.Logf("sbpeer on port %d, stderr:\n%s\nevents:\n%s", p.Port, p.Stderr(), itail(p.dump(), 60))
		}
	})
	return p, nil
}

func freePort() (int, error) {
	for range 10 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return 0, err
		}
		port := l.Addr().(*net.TCPAddr).Port
		l.Close()
		if port != 5672 {
			return port, nil
		}
	}
	return 0, errors.New("no free port")
}

type lockedWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (w *lockedWriter) Write(b []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.w.Write(b)
}

// read collects events until the peer's stdout ends. It is the one reader
// goroutine; stop waits for it.
func (p *Peer) read(r io.Reader) {
	defer close(p.done)
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64*1024), 16*1024*1024)
	for sc.Scan() {
		line := sc.Text()
		var e Event
		if err := json.Unmarshal([]byte(line), &e); err != nil {
			e = Event{Name: "unparsed"}
		}
		e.Line = line
		p.mu.Lock()
		p.events = append(p.events, e)
		close(p.changed)
		p.changed = make(chan struct{})
		p.mu.Unlock()
	}
}

// stop closes the peer's stdin, which makes it exit, and kills it if it
// has not within a few seconds.
func (p *Peer) stop() {
	p.stdin.Close()
	select {
	case <-p.done:
	case <-time.After(5 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
	_ = p.cmd.Wait()
}

// Stop ends the peer now, before the test's cleanup, to test a broker that
// went away. Later calls on p still read the events collected so far.
func (p *Peer) Stop() { p.stop() }

// ConnectionString is a Service Bus connection string for the peer, with
// UseDevelopmentEmulator=true so that the SDK speaks plain AMQP to the given
// port.
func (p *Peer) ConnectionString() string {
	return fmt.Sprintf("Endpoint=sb://127.0.0.1:%d;SharedAccessKeyName=sbpeer;SharedAccessKey=%s;UseDevelopmentEmulator=true", p.Port, Key)
}

// Stderr returns what the peer printed on stderr so far.
func (p *Peer) Stderr() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.stderr.String()
}

// Events returns the events so far, oldest first.
func (p *Peer) Events() []Event {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]Event(nil), p.events...)
}

// Find returns the events that match, oldest first.
func (p *Peer) Find(match func(Event) bool) []Event {
	var out []Event
	for _, e := range p.Events() {
		if match(e) {
			out = append(out, e)
		}
	}
	return out
}

// WaitFor returns the first event (since the peer started) that matches,
// waiting up to timeout for it; it fails the test otherwise.
func (p *Peer) WaitFor(timeout time.Duration, what string, match func(Event) bool) Event {
	p.t.Helper()
	e, err := p.wait(timeout, match)
	if err != nil {
		p.t.Fatalf("sbpeer: waiting for %s: %v; events:\n%s", what, err, p.dump())
	}
	return e
}

// WaitForN waits until n events match and returns them.
func (p *Peer) WaitForN(timeout time.Duration, n int, what string, match func(Event) bool) []Event {
	p.t.Helper()
	var got []Event
	_, err := p.wait(timeout, func(Event) bool {
		got = p.findLocked(match)
		return len(got) >= n
	})
	if err != nil {
		p.t.Fatalf("sbpeer: waiting for %d × %s (have %d): %v; events:\n%s", n, what, len(got), err, p.dump())
	}
	return got
}

func (p *Peer) findLocked(match func(Event) bool) []Event {
	var out []Event
	for _, e := range p.events {
		if match(e) {
			out = append(out, e)
		}
	}
	return out
}

// wait blocks until an event matches, the peer exits or timeout passes.
// match is called with p.mu held.
func (p *Peer) wait(timeout time.Duration, match func(Event) bool) (Event, error) {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	seen := 0
	for {
		p.mu.Lock()
		for ; seen < len(p.events); seen++ {
			if match(p.events[seen]) {
				e := p.events[seen]
				p.mu.Unlock()
				return e, nil
			}
		}
		changed := p.changed
		p.mu.Unlock()
		select {
		case <-changed:
		case <-p.done:
			// Drain what the reader collected before it ended.
			p.mu.Lock()
			n := len(p.events)
			p.mu.Unlock()
			if seen == n {
				return Event{}, errors.New("the peer exited")
			}
		case <-deadline.C:
			return Event{}, fmt.Errorf("timed out after %v", timeout)
		}
	}
}

func (p *Peer) dump() string {
	var b strings.Builder
	for _, e := range p.Events() {
		b.WriteString(e.Line)
		b.WriteByte('\n')
	}
	return b.String()
}

// Command sends a command to the peer and returns its reply. Commands are
// "stats", "expire_locks" {queue}, "lock_duration" {queue, ms} and "send"
// {queue, body, message_id, correlation_id, reply_to, reply_to_session_id,
// session_id, content_type, application_properties}.
func (p *Peer) Command(cmd map[string]any) Event {
	p.t.Helper()
	p.mu.Lock()
	p.nextID++
	id := p.nextID
	p.mu.Unlock()
	c := map[string]any{"id": id}
	for k, v := range cmd {
		c[k] = v
	}
	line, err := json.Marshal(c)
	if err != nil {
		p.t.Fatalf("sbpeer: command: %v", err)
	}
	p.wmu.Lock()
	_, err = p.stdin.Write(append(line, '\n'))
	p.wmu.Unlock()
	if err != nil {
		p.t.Fatalf("sbpeer: command %s: %v", line, err)
	}
	e := p.WaitFor(10*time.Second, "reply to "+string(line), func(e Event) bool { return e.Name == "reply" && e.ID == id })
	if e.Error != "" {
		p.t.Fatalf("sbpeer: command %s: %s", line, e.Error)
	}
	return e
}

// QueueStats counts a queue's messages.
type QueueStats struct {
	Available int `json:"available"`
	Locked    int `json:"locked"`
}

// Stats returns every queue the peer has seen with its message counts.
func (p *Peer) Stats() map[string]QueueStats {
	p.t.Helper()
	e := p.Command(map[string]any{"cmd": "stats"})
	var r struct {
		Queues map[string]QueueStats `json:"queues"`
	}
	if err := json.Unmarshal([]byte(e.Line), &r); err != nil {
		p.t.Fatalf("sbpeer: stats: %v", err)
	}
	return r.Queues
}

// ExpireLocks ends every lock held on queue now, as if their lock duration
// had passed: the messages become available with their delivery count
// raised. It returns how many locks it ended.
func (p *Peer) ExpireLocks(queue string) int {
	p.t.Helper()
	e := p.Command(map[string]any{"cmd": "expire_locks", "queue": queue})
	var r struct {
		Expired int `json:"expired"`
	}
	_ = json.Unmarshal([]byte(e.Line), &r)
	return r.Expired
}

// SetLockDuration changes the lock duration of one queue.
func (p *Peer) SetLockDuration(queue string, d time.Duration) {
	p.t.Helper()
	p.Command(map[string]any{"cmd": "lock_duration", "queue": queue, "ms": d.Milliseconds()})
}

// Send enqueues a message as if a producer had sent it, for properties the
// driver's Publish does not set (ReplyToSessionID).
type Send struct {
	Queue                 string            `json:"queue"`
	Body                  string            `json:"body"`
	MessageID             string            `json:"message_id,omitempty"`
	CorrelationID         string            `json:"correlation_id,omitempty"`
	ReplyTo               string            `json:"reply_to,omitempty"`
	ReplyToSessionID      string            `json:"reply_to_session_id,omitempty"`
	SessionID             string            `json:"session_id,omitempty"`
	ContentType           string            `json:"content_type,omitempty"`
	ApplicationProperties map[string]string `json:"application_properties,omitempty"`
}

// Enqueue puts m on its queue and returns its sequence number.
func (p *Peer) Enqueue(m Send) int64 {
	p.t.Helper()
	b, _ := json.Marshal(m)
	cmd := map[string]any{"cmd": "send"}
	_ = json.Unmarshal(b, &cmd)
	cmd["cmd"] = "send"
	return p.Command(cmd).Seq
}

// RequireSessions makes queue session-enabled, as Service Bus's
// RequiresSession does: sends without a session id are rejected, and only
// receivers that accept a session may attach.
func (p *Peer) RequireSessions(queue string) {
	p.t.Helper()
	p.Command(map[string]any{"cmd": "sessions", "queue": queue})
}

// SetMaxMessages caps queue at n messages: a send beyond is rejected with
// amqp:resource-limit-exceeded, as Service Bus rejects a send to a full
// entity (Service Bus counts bytes; the peer counts messages).
func (p *Peer) SetMaxMessages(queue string, n int) {
	p.t.Helper()
	p.Command(map[string]any{"cmd": "max_messages", "queue": queue, "n": n})
}

// itail returns the last n lines of s.
func itail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
