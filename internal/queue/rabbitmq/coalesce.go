package rabbitmq

import (
	"net"
	"sync"
	"time"
)

// coalescingConn gathers what amqp091-go writes into as few socket writes
// as the load allows. amqp091-go flushes after every publish and every ack,
// one write(2) each, while it holds its connection's send lock; at thousands
// of messages a second that is a system call and a TCP send per message
// each way, and on the broker a socket read each. Here a Write only copies
// the bytes and hands them to one writer goroutine; while that goroutine is
// in write(2), what is written meanwhile gathers and goes out in its next
// write, together. Nothing is held back on a timer (this is not Nagle's
// algorithm): an idle connection's frame goes out as soon as the writer
// goroutine runs.
//
// Errors and flow control: the first failed socket write closes the socket,
// so amqp091-go's reader sees the connection end and shuts it down, and is
// returned by every later Write. A Write returning is no promise of delivery
// with or without this type: AMQP's promises are publisher confirms, and
// the broker redelivers what it did not see acked. At most maxPending bytes
// wait; a Write beyond that blocks until the writer takes them, so the
// broker's TCP flow control still holds publishers back.
//
// Close flushes what is pending (for at most closeFlush), closes the socket
// and waits for the writer goroutine. Safe for concurrent use.
type coalescingConn struct {
	net.Conn

	mu      sync.Mutex
	room    sync.Cond // broadcast when the writer takes the pending bytes, or it ends
	pending []byte
	closing bool
	err     error // the first socket write error, or net.ErrClosed once closing

	kick chan struct{} // capacity 1: pending bytes appeared
	done chan struct{} // closed when the writer goroutine returns
}

const (
	maxPending = 1 << 20
	closeFlush = 2 * time.Second
)

func newCoalescingConn(c net.Conn) *coalescingConn {
	cc := &coalescingConn{Conn: c, kick: make(chan struct{}, 1), done: make(chan struct{})}
	cc.room.L = &cc.mu
	go cc.writeLoop()
	return cc
}

// Write copies p to be sent by the writer goroutine.
func (c *coalescingConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	for c.err == nil && len(c.pending) > 0 && len(c.pending)+len(p) > maxPending {
		c.room.Wait()
	}
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return 0, err
	}
	wake := len(c.pending) == 0
	c.pending = append(c.pending, p...)
	c.mu.Unlock()
	if wake {
		c.wake()
	}
	return len(p), nil
}

func (c *coalescingConn) wake() {
	select {
	case c.kick <- struct{}{}:
	default: // a wake-up is already due
	}
}

// writeLoop sends what Write gathered, all of it in one write(2) each time,
// until the socket fails or Close has had it flushed.
func (c *coalescingConn) writeLoop() {
	defer close(c.done)
	var out []byte
	for range c.kick {
		for {
			c.mu.Lock()
			if len(c.pending) == 0 {
				closing := c.closing
				c.mu.Unlock()
				if closing {
					return
				}
				break
			}
			// The two buffers swap: Write fills one while this sends the other.
			out, c.pending = c.pending, out[:0]
			c.room.Broadcast()
			c.mu.Unlock()
			if _, err := c.Conn.Write(out); err != nil {
				c.mu.Lock()
				if c.err == nil || c.err == net.ErrClosed {
					c.err = err
				}
				c.pending = nil
				c.room.Broadcast()
				c.mu.Unlock()
				_ = c.Conn.Close()
				return
			}
			if cap(out) > maxPending {
				out = nil // a burst's buffer is not kept for good
			}
		}
	}
}

// Close flushes what is pending, for at most closeFlush, then closes the
// socket and waits for the writer goroutine.
func (c *coalescingConn) Close() error {
	c.mu.Lock()
	if c.closing {
		c.mu.Unlock()
		<-c.done
		return net.ErrClosed
	}
	c.closing = true
	if c.err == nil {
		c.err = net.ErrClosed
	}
	c.room.Broadcast()
	c.mu.Unlock()
	c.wake()
	t := time.NewTimer(closeFlush)
	select {
	case <-c.done:
	case <-t.C: // the peer takes nothing: closing the socket ends the write
	}
	t.Stop()
	err := c.Conn.Close()
	<-c.done
	return err
}
