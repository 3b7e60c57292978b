// Package gpu reads the memory and utilisation of the GPUs a worker runs on,
// through NVIDIA's NVML (github.com/NVIDIA/go-nvml).
//
// A Reader is built with New, started with Open and stopped with Shutdown.
// Open loads libnvidia-ml and resolves the selected devices once; each Read
// then queries every selected device and reports, per device, its memory in
// bytes (total, free, used) and its utilisation in percent. A device that
// fails to read carries its own error in Device.Err; the others are still
// read.
//
// # Nodes without a GPU
//
// Where libnvidia-ml is absent (a CPU-only node, a container started without
// the NVIDIA runtime) or the binary was built without cgo, Open returns an
// error wrapping ErrNoNVML; where no device is selected or present it
// returns one wrapping ErrNoDevices. Either way nothing else is called: the
// caller logs once and sizes batches from configuration alone. This matters
// because go-nvml links NVML lazily: once Init has failed, calling any other
// NVML function ends the process with "symbol lookup error" (exit 127),
// which no recover can catch. The Reader therefore calls nothing but Init
// until Init has succeeded, and nothing at all after Shutdown.
//
// # Device selection
//
// ParseDevices turns SOUS_GPU_DEVICES (with NVIDIA_VISIBLE_DEVICES as its
// default) into a Selection. This package never reads the environment; the
// caller passes the values in.
//
// # Concurrency
//
// A Reader is safe for concurrent use. Read and FreeBytes may run in
// parallel; Shutdown waits for reads in progress before it unloads NVML.
// The tests substitute go-nvml's simulated servers (pkg/nvml/mock/dgxa100,
// dgxh100, ...) for the library through Options.Library.
package gpu
