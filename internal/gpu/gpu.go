package gpu

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

var (
	// ErrNoNVML means NVML cannot be used on this node: libnvidia-ml is
	// absent, the NVIDIA driver is not loaded, or the binary was built
	// without cgo. Batch sizes then come from configuration alone.
	ErrNoNVML = errors.New("gpu: NVML not available")

	// ErrNoDevices means NVML works but no device is selected or present.
	ErrNoDevices = errors.New("gpu: no GPU device selected")

	// ErrNotOpen is returned by Read and FreeBytes before a successful Open
	// and after Shutdown.
	ErrNotOpen = errors.New("gpu: reader not open")

	// ErrClosed is returned by Open after Shutdown.
	ErrClosed = errors.New("gpu: reader shut down")
)

// Options configure a Reader.
type Options struct {
	// Devices selects the devices to read (SOUS_GPU_DEVICES, parsed with
	// ParseDevices). The zero value selects every device NVML enumerates.
	Devices Selection

	// Library is the NVML implementation. Nil means the real libnvidia-ml
	// through go-nvml; tests pass one of go-nvml's simulated servers.
	Library Library
}

// Memory is one device's memory, in bytes, as NVML reports it. Used
// includes memory the driver reserves, so Free+Used can equal Total.
type Memory struct {
	TotalBytes uint64
	FreeBytes  uint64
	UsedBytes  uint64
}

// Utilization is one device's utilisation over NVML's last sample period
// (between 1/6 s and 1 s, depending on the device), in percent, 0 to 100.
type Utilization struct {
	// GPUPercent is the share of the period in which a kernel ran.
	GPUPercent uint32
	// MemoryPercent is the share of the period in which device memory was
	// read or written.
	MemoryPercent uint32
}

// Device is one reading of one device.
type Device struct {
	// Index is NVML's index of the device (inside a container, its index
	// among the devices the container sees); -1 when unknown.
	Index int
	// UUID is the device's UUID ("GPU-..." or "MIG-..."); empty when unknown.
	UUID string
	// Name is the product name, such as "NVIDIA H100 80GB HBM3".
	Name string

	Memory Memory

	// Utilization is valid only when UtilizationOK is true: MIG instances
	// and some virtual GPUs do not report it. A device without utilisation
	// is still a good reading.
	Utilization   Utilization
	UtilizationOK bool

	// Err is non-nil when the device's memory could not be read; Memory and
	// Utilization are then zero.
	Err error
}

// Selection is the set of devices a Reader reads. The zero value selects
// every device NVML enumerates. A Selection is immutable and safe to share.
type Selection struct {
	none bool
	ids  []deviceID // nil: every device
}

// deviceID names one device by NVML index or, when uuid is set, by UUID.
type deviceID struct {
	index int
	uuid  string
}

func (id deviceID) String() string {
	if id.uuid != "" {
		return id.uuid
	}
	return strconv.Itoa(id.index)
}

// All reports whether s selects every device NVML enumerates.
func (s Selection) All() bool { return !s.none && s.ids == nil }

// None reports whether s selects no device, which turns GPU readings off.
func (s Selection) None() bool { return s.none }

// String returns s in the syntax ParseDevices accepts: "all", "none" or a
// comma-separated list of indices and UUIDs.
func (s Selection) String() string {
	switch {
	case s.none:
		return "none"
	case s.ids == nil:
		return "all"
	}
	parts := make([]string, len(s.ids))
	for i, id := range s.ids {
		parts[i] = id.String()
	}
	return strings.Join(parts, ",")
}

// ParseDevices parses the device selection.
//
// devices is the value of SOUS_GPU_DEVICES: "all", "none", or a
// comma-separated list of NVML indices ("0,1") and device UUIDs
// ("GPU-8c5d...,MIG-1f0a..."), case-insensitive keywords, spaces ignored.
// An empty value means the variable is unset, and the selection then
// follows visible, the value of NVIDIA_VISIBLE_DEVICES:
//
//   - "", "all": every device;
//   - "none", "void": no device;
//   - a list of UUIDs: those devices;
//   - anything else (indices such as "0,1", MIG notation such as "0:1"):
//     every device, because the NVIDIA container runtime has already
//     limited the container to those devices and NVML numbers them from 0
//     inside it, so host indices would select the wrong ones.
//
// Only devices is validated: visible is set by the platform, and a value
// this function does not understand selects every device.
func ParseDevices(devices, visible string) (Selection, error) {
	devices = strings.TrimSpace(devices)
	if devices == "" {
		return parseVisible(visible), nil
	}
	switch strings.ToLower(devices) {
	case "all":
		return Selection{}, nil
	case "none":
		return Selection{none: true}, nil
	}
	var ids []deviceID
	seen := make(map[deviceID]bool)
	for field := range strings.SplitSeq(devices, ",") {
		id, err := parseID(strings.TrimSpace(field))
		if err != nil {
			return Selection{}, err
		}
		if !seen[id] {
			seen[id] = true
			ids = append(ids, id)
		}
	}
	return Selection{ids: ids}, nil
}

func parseVisible(visible string) Selection {
	visible = strings.TrimSpace(visible)
	switch strings.ToLower(visible) {
	case "", "all":
		return Selection{}
	case "none", "void":
		return Selection{none: true}
	}
	var ids []deviceID
	for field := range strings.SplitSeq(visible, ",") {
		field = strings.TrimSpace(field)
		if !isUUID(field) {
			return Selection{}
		}
		ids = append(ids, deviceID{index: -1, uuid: field})
	}
	return Selection{ids: ids}
}

func parseID(field string) (deviceID, error) {
	if field == "" {
		return deviceID{}, errors.New("gpu: empty device in list")
	}
	if isUUID(field) {
		return deviceID{index: -1, uuid: field}, nil
	}
	n, err := strconv.Atoi(field)
	if err != nil || n < 0 || strings.HasPrefix(field, "+") {
		return deviceID{}, fmt.Errorf("gpu: device %q: want an index (0, 1, ...), a GPU-/MIG- UUID, \"all\" or \"none\"", field)
	}
	return deviceID{index: n}, nil
}

// isUUID reports whether s looks like an NVML device UUID: "GPU-" or "MIG-"
// followed by the identifier. The identifier is not checked further, so
// older MIG forms ("MIG-GPU-.../1/0") pass; Open reports names NVML does
// not know.
func isUUID(s string) bool {
	if len(s) <= len("GPU-") || strings.ContainsAny(s, " \t") {
		return false
	}
	prefix := strings.ToUpper(s[:len("GPU-")])
	return prefix == "GPU-" || prefix == "MIG-"
}
