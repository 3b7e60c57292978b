//go:build !cgo

package gpu

import (
	"context"
	"fmt"
	"sync"
)

// Library stands in for NVML in binaries built without cgo. go-nvml needs
// cgo, so nothing satisfies Library in such a binary and every Reader
// reports ErrNoNVML.
type Library interface {
	nvmlNeedsCgo()
}

// Reader is the cgo-less Reader: Open always fails with ErrNoNVML (or
// ErrNoDevices for an empty selection), so callers size from configuration.
type Reader struct {
	sel    Selection
	mu     sync.Mutex
	closed bool
}

// New returns a Reader for opts.
func New(opts Options) *Reader {
	return &Reader{sel: opts.Devices}
}

// Open returns an error wrapping ErrNoNVML: this binary was built without
// cgo and cannot load libnvidia-ml. After Shutdown it returns ErrClosed.
func (r *Reader) Open(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	switch {
	case r.closed:
		return ErrClosed
	case r.sel.None():
		return fmt.Errorf("%w: selection is %q", ErrNoDevices, r.sel)
	}
	return fmt.Errorf("%w: built without cgo", ErrNoNVML)
}

// Read returns ErrNotOpen.
func (r *Reader) Read(context.Context) ([]Device, error) { return nil, ErrNotOpen }

// FreeBytes returns ErrNotOpen.
func (r *Reader) FreeBytes(context.Context) ([]uint64, error) { return nil, ErrNotOpen }

// Shutdown marks the Reader closed. It is safe to call more than once.
func (r *Reader) Shutdown() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.closed = true
	return nil
}
