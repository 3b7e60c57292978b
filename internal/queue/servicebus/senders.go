package servicebus

import (
	"container/list"
	"context"

	"github.com/sous-run/sous/internal/queue"
)

// senderCache holds one sender per destination queue, least recently used
// last. It is guarded by Driver.mu.
type senderCache struct {
	max int
	m   map[string]*list.Element // of *cachedSender
	lru list.List
}

type cachedSender struct {
	queue   string
	s       sender
	refs    int  // Publish calls using it
	evicted bool // out of the cache; closed when refs drops to 0
	closed  bool // handed to Close once
}

func newSenderCache(max int) senderCache {
	return senderCache{max: max, m: make(map[string]*list.Element)}
}

func (c *senderCache) remove(cs *cachedSender) {
	if el, ok := c.m[cs.queue]; ok && el.Value == cs {
		c.lru.Remove(el)
		delete(c.m, cs.queue)
	}
	cs.evicted = true
}

// drain empties the cache and returns every sender, for Close.
func (c *senderCache) drain() []sender {
	var out []sender
	for el := c.lru.Front(); el != nil; el = el.Next() {
		cs := el.Value.(*cachedSender)
		cs.evicted, cs.closed = true, true
		out = append(out, cs.s)
	}
	c.lru.Init()
	clear(c.m)
	return out
}

// acquireSender returns the cached sender for the queue to, creating it
// (the SDK does no I/O for that) and evicting the least recently used one
// beyond the bound. The caller must releaseSender it.
func (d *Driver) acquireSender(to string) (*cachedSender, error) {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return nil, queue.ErrClosed
	}
	c := &d.senders
	if el, ok := c.m[to]; ok {
		c.lru.MoveToFront(el)
		cs := el.Value.(*cachedSender)
		cs.refs++
		d.mu.Unlock()
		return cs, nil
	}
	s, err := d.b.newSender(to)
	if err != nil {
		d.mu.Unlock()
		return nil, err
	}
	cs := &cachedSender{queue: to, s: s, refs: 1}
	c.m[to] = c.lru.PushFront(cs)
	var idle []sender
	for c.lru.Len() > c.max {
		old := c.lru.Back().Value.(*cachedSender)
		c.remove(old)
		if old.refs == 0 {
			old.closed = true
			idle = append(idle, old.s)
		}
	}
	d.mu.Unlock()
	d.closeSenders(idle)
	return cs, nil
}

// releaseSender ends one use; failed drops the sender from the cache so
// that the next Publish builds a fresh one.
func (d *Driver) releaseSender(cs *cachedSender, failed bool) {
	d.mu.Lock()
	cs.refs--
	if failed && !cs.evicted {
		d.senders.remove(cs)
	}
	var idle []sender
	if cs.evicted && cs.refs == 0 && !cs.closed {
		cs.closed = true
		idle = append(idle, cs.s)
	}
	d.mu.Unlock()
	d.closeSenders(idle)
}

func (d *Driver) closeSenders(ss []sender) {
	for _, s := range ss {
		ctx, cancel := context.WithTimeout(context.Background(), closeSenderTimeout)
		if err := s.Close(ctx); err != nil {
			d.log.Debug("servicebus sender close failed", "err", err)
		}
		cancel()
	}
}
