//go:build cgo

package gpu

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
)

// Library is the part of NVML a Reader uses. The real library
// (nvml.New()) and go-nvml's simulated servers (mock/dgxa100, dgxh100, ...)
// satisfy it.
type Library interface {
	Init() nvml.Return
	Shutdown() nvml.Return
	DeviceGetCount() (int, nvml.Return)
	DeviceGetHandleByIndex(index int) (nvml.Device, nvml.Return)
	DeviceGetHandleByUUID(uuid string) (nvml.Device, nvml.Return)
}

var _ Library = nvml.Interface(nil)

type readerState int

const (
	stateNew readerState = iota
	stateOpen
	stateClosed
)

// Reader reads the selected devices through NVML. Build one with New.
type Reader struct {
	lib Library
	sel Selection

	// mu is held for reading during Read, and for writing by Open and
	// Shutdown, so NVML is never unloaded under a read in progress.
	mu    sync.RWMutex
	state readerState
	devs  []handle
}

// handle is a device resolved by Open.
type handle struct {
	dev   nvml.Device
	index int
	uuid  string
	name  string
}

func (h handle) String() string {
	if h.uuid == "" {
		return fmt.Sprintf("GPU %d", h.index)
	}
	return fmt.Sprintf("GPU %d (%s)", h.index, h.uuid)
}

// New returns a Reader for opts. It loads nothing; call Open.
func New(opts Options) *Reader {
	lib := opts.Library
	if lib == nil {
		lib = nvml.New()
	}
	return &Reader{lib: lib, sel: opts.Devices}
}

// Open initialises NVML and resolves the selected devices. It returns an
// error wrapping ErrNoNVML where NVML cannot be used on this node, one
// wrapping ErrNoDevices where no device is selected or present, and a
// plain error where a selected device does not exist; in each case the
// Reader stays unopened and holds nothing, and Open may be called again.
// Open on an open Reader does nothing; after Shutdown it returns ErrClosed.
func (r *Reader) Open(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	switch r.state {
	case stateOpen:
		return nil
	case stateClosed:
		return ErrClosed
	}
	if r.sel.None() {
		return fmt.Errorf("%w: selection is %q", ErrNoDevices, r.sel)
	}
	if err := initLibrary(r.lib); err != nil {
		return err
	}
	devs, err := r.resolve()
	if err == nil && len(devs) == 0 {
		err = fmt.Errorf("%w: NVML reports no device", ErrNoDevices)
	}
	if err != nil {
		_ = shutdownLibrary(r.lib)
		return err
	}
	r.devs = devs
	r.state = stateOpen
	return nil
}

// initLibrary calls Init, converting a panic (a broken library binding or
// a test double) into ErrNoNVML. When libnvidia-ml is missing, go-nvml's
// Init does not panic: its dlopen fails and Init returns
// ERROR_LIBRARY_NOT_FOUND.
func initLibrary(lib Library) (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("%w: NVML init panicked: %v", ErrNoNVML, p)
		}
	}()
	switch ret := lib.Init(); ret {
	case nvml.SUCCESS:
		return nil
	case nvml.ERROR_LIBRARY_NOT_FOUND, nvml.ERROR_DRIVER_NOT_LOADED:
		return fmt.Errorf("%w: %w", ErrNoNVML, ret)
	default:
		return fmt.Errorf("gpu: NVML init: %w", ret)
	}
}

func shutdownLibrary(lib Library) (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("gpu: NVML shutdown panicked: %v", p)
		}
	}()
	if ret := lib.Shutdown(); ret != nvml.SUCCESS {
		return fmt.Errorf("gpu: NVML shutdown: %w", ret)
	}
	return nil
}

// resolve turns the selection into device handles. A device named twice
// (by index and by UUID) is read once.
func (r *Reader) resolve() (devs []handle, err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("gpu: resolve devices: NVML panicked: %v", p)
		}
	}()
	ids := r.sel.ids
	if ids == nil {
		n, ret := r.lib.DeviceGetCount()
		if ret != nvml.SUCCESS {
			return nil, fmt.Errorf("gpu: count devices: %w", ret)
		}
		ids = make([]deviceID, n)
		for i := range ids {
			ids[i] = deviceID{index: i}
		}
	}
	seen := make(map[string]bool)
	for _, id := range ids {
		var (
			dev nvml.Device
			ret nvml.Return
		)
		if id.uuid != "" {
			dev, ret = r.lib.DeviceGetHandleByUUID(id.uuid)
		} else {
			dev, ret = r.lib.DeviceGetHandleByIndex(id.index)
		}
		if ret != nvml.SUCCESS {
			return nil, fmt.Errorf("gpu: select device %s: %w", id, ret)
		}
		h := describe(dev, id)
		if h.uuid != "" {
			if seen[h.uuid] {
				continue
			}
			seen[h.uuid] = true
		}
		devs = append(devs, h)
	}
	return devs, nil
}

// describe reads a device's identity. Identity is for reports only, so a
// failure leaves the field unknown rather than failing the device.
func describe(dev nvml.Device, id deviceID) handle {
	h := handle{dev: dev, index: -1, uuid: id.uuid}
	if id.uuid == "" {
		h.index = id.index
	}
	if idx, ret := dev.GetIndex(); ret == nvml.SUCCESS {
		h.index = idx
	}
	if uuid, ret := dev.GetUUID(); ret == nvml.SUCCESS {
		h.uuid = uuid
	}
	if name, ret := dev.GetName(); ret == nvml.SUCCESS {
		h.name = name
	}
	return h
}

// Read queries every selected device, in selection order. A device that
// fails carries the failure in its Err and the others are still read, so
// the error result is non-nil only when nothing was read: before Open,
// after Shutdown (ErrNotOpen) or when ctx is done.
//
// NVML queries do not block on the GPU's work, but they are not
// cancellable; ctx is checked between devices.
func (r *Reader) Read(ctx context.Context) ([]Device, error) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	if r.state != stateOpen {
		return nil, ErrNotOpen
	}
	out := make([]Device, 0, len(r.devs))
	for _, h := range r.devs {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		out = append(out, readDevice(h))
	}
	return out, nil
}

func readDevice(h handle) (d Device) {
	d = Device{Index: h.index, UUID: h.uuid, Name: h.name}
	defer func() {
		if p := recover(); p != nil {
			d.Memory = Memory{}
			d.Err = fmt.Errorf("gpu: %s: read memory: NVML panicked: %v", h, p)
		}
	}()
	mem, ret := h.dev.GetMemoryInfo()
	if ret != nvml.SUCCESS {
		d.Err = fmt.Errorf("gpu: %s: read memory: %w", h, ret)
		return d
	}
	d.Memory = Memory{TotalBytes: mem.Total, FreeBytes: mem.Free, UsedBytes: mem.Used}
	d.Utilization, d.UtilizationOK = readUtilization(h.dev)
	return d
}

// readUtilization reads utilisation, which is optional: devices that do not
// support it (MIG instances) and failures leave ok false.
func readUtilization(dev nvml.Device) (u Utilization, ok bool) {
	defer func() {
		if recover() != nil {
			u, ok = Utilization{}, false
		}
	}()
	rates, ret := dev.GetUtilizationRates()
	if ret != nvml.SUCCESS {
		return Utilization{}, false
	}
	return Utilization{GPUPercent: rates.Gpu, MemoryPercent: rates.Memory}, true
}

// FreeBytes returns the free memory, in bytes, of each selected device that
// could be read, in selection order, and a joined error naming each device
// that could not. It satisfies sizing.MemorySource.
func (r *Reader) FreeBytes(ctx context.Context) ([]uint64, error) {
	devs, err := r.Read(ctx)
	if err != nil {
		return nil, err
	}
	free := make([]uint64, 0, len(devs))
	var errs []error
	for _, d := range devs {
		if d.Err != nil {
			errs = append(errs, d.Err)
			continue
		}
		free = append(free, d.Memory.FreeBytes)
	}
	return free, errors.Join(errs...)
}

// Shutdown waits for reads in progress, then shuts NVML down. It is safe to
// call more than once and before Open; afterwards Read returns ErrNotOpen
// and Open returns ErrClosed.
func (r *Reader) Shutdown() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	wasOpen := r.state == stateOpen
	r.state = stateClosed
	r.devs = nil
	if !wasOpen {
		return nil
	}
	return shutdownLibrary(r.lib)
}
