package rabbitmq

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

// tcpPair is a connected loopback TCP pair: the client end wrapped.
func tcpPair(t *testing.T) (*coalescingConn, net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	raw, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	peer := <-accepted
	if peer == nil {
		t.Fatal("accept failed")
	}
	c := newCoalescingConn(raw)
	t.Cleanup(func() {
		_ = c.Close()
		_ = peer.Close()
		<-c.done // the writer goroutine is gone
	})
	return c, peer
}

// TestCoalescingKeepsEachWriteWhole: many goroutines write numbered records
// at once. Each Write arrives whole (never interleaved with another's), and
// each writer's records arrive in the order it wrote them, all of them.
func TestCoalescingKeepsEachWriteWhole(t *testing.T) {
	t.Parallel()
	c, peer := tcpPair(t)
	const writers, each = 8, 2000
	// A record: writer (1 byte), sequence (4 bytes), a payload whose length
	// varies, and its length up front (2 bytes), so a torn write shows.
	record := func(w, i int) []byte {
		payload := bytes.Repeat([]byte{byte(w)}, 1+(i*7)%300)
		b := make([]byte, 7, 7+len(payload))
		binary.BigEndian.PutUint16(b, uint16(len(payload)))
		b[2] = byte(w)
		binary.BigEndian.PutUint32(b[3:], uint32(i))
		return append(b, payload...)
	}
	var wg sync.WaitGroup
	for w := range writers {
		wg.Go(func() {
			for i := range each {
				if _, err := c.Write(record(w, i)); err != nil {
					t.Errorf("write: %v", err)
					return
				}
			}
		})
	}
	next := make([]int, writers)
	done := make(chan error, 1)
	go func() {
		hdr := make([]byte, 7)
		for n := 0; n < writers*each; n++ {
			if _, err := io.ReadFull(peer, hdr); err != nil {
				done <- err
				return
			}
			size, w, i := int(binary.BigEndian.Uint16(hdr)), int(hdr[2]), int(binary.BigEndian.Uint32(hdr[3:]))
			payload := make([]byte, size)
			if _, err := io.ReadFull(peer, payload); err != nil {
				done <- err
				return
			}
			if w >= writers || i != next[w] || !bytes.Equal(payload, bytes.Repeat([]byte{byte(w)}, size)) {
				done <- errors.New("a record arrived torn or out of its writer's order")
				return
			}
			next[w]++
		}
		done <- nil
	}()
	wg.Wait()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// TestCoalescingBoundsWhatWaits: a peer that reads nothing holds the
// writers back once maxPending bytes wait (TCP flow control still works);
// when it reads, everything arrives.
func TestCoalescingBoundsWhatWaits(t *testing.T) {
	t.Parallel()
	c, peer := tcpPair(t)
	chunk := bytes.Repeat([]byte("x"), 64<<10)
	const total = 16 << 20 // far more than the socket buffers and maxPending
	wrote := make(chan error, 1)
	go func() {
		for n := 0; n < total; n += len(chunk) {
			if _, err := c.Write(chunk); err != nil {
				wrote <- err
				return
			}
		}
		wrote <- nil
	}()
	// While the peer does not read, what waits never passes the bound.
	deadline := time.Now().Add(500 * time.Millisecond)
	for time.Now().Before(deadline) {
		c.mu.Lock()
		n := len(c.pending)
		c.mu.Unlock()
		if n > maxPending {
			t.Fatalf("%d bytes wait, more than maxPending (%d)", n, maxPending)
		}
		time.Sleep(5 * time.Millisecond)
	}
	got, err := io.CopyN(io.Discard, peer, total)
	if err != nil || got != total {
		t.Fatalf("read %d of %d bytes: %v", got, total, err)
	}
	if err := <-wrote; err != nil {
		t.Fatal(err)
	}
}

// TestCoalescingCloseFlushes: what was written before Close reaches the
// peer, then the connection ends.
func TestCoalescingCloseFlushes(t *testing.T) {
	t.Parallel()
	c, peer := tcpPair(t)
	want := bytes.Repeat([]byte("close-ok "), 10000)
	if _, err := c.Write(want); err != nil {
		t.Fatal(err)
	}
	closed := make(chan error, 1)
	go func() { closed <- c.Close() }()
	got, err := io.ReadAll(peer)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("the peer read %d bytes, want %d", len(got), len(want))
	}
	if err := <-closed; err != nil {
		t.Fatalf("close: %v", err)
	}
	if _, err := c.Write([]byte("late")); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("a write after Close: %v, want net.ErrClosed", err)
	}
}

// TestCoalescingWriteErrorSticks: once the socket fails, Writes fail too,
// and the writer goroutine is gone.
func TestCoalescingWriteErrorSticks(t *testing.T) {
	t.Parallel()
	c, peer := tcpPair(t)
	_ = peer.(*net.TCPConn).SetLinger(0) // close with a reset: the next send fails
	_ = peer.Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := c.Write([]byte("after the peer left"))
		if err != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("writes to a reset connection kept succeeding")
		}
		time.Sleep(time.Millisecond)
	}
	select {
	case <-c.done:
	case <-time.After(10 * time.Second):
		t.Fatal("the writer goroutine did not end after the socket failed")
	}
	if _, err := c.Write([]byte("x")); err == nil || errors.Is(err, net.ErrClosed) {
		t.Fatalf("a write after the failure: %v, want the socket's error", err)
	}
}
