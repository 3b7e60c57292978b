// Package sizing decides how many messages go into the next GPU batch.
//
// The size is
//
//	clamp(floor((free - reserve) / bytesPerItem), Min, Max)
//
// then capped by an AIMD ceiling and by the engine's parallelism:
//
//   - free is the free device memory in bytes, read from a MemorySource
//     (NVML through internal/gpu) on an interval by Run or Refresh, never
//     per call of Size. Where the batch runs on several devices, free is
//     the minimum over them: one engine spreads a batch across its devices,
//     and the fullest device runs out of memory first.
//   - reserve (ReserveBytes) is memory kept back for everything that is not
//     a batch item: activations, allocator fragmentation, other processes.
//   - bytesPerItem is the memory one item needs: set explicitly, or derived
//     from the model's context length times its KV-cache bytes per token.
//   - the ceiling closes the loop with the engine. An out-of-memory or
//     "too many requests" answer (Overloaded) halves it; each batch that
//     succeeds at the ceiling (Succeeded) raises it by a step, up to Max.
//   - EngineParallel caps the size at what the engine runs at once (such as
//     Ollama's parallel slots). For an engine that shows its running and
//     waiting requests but not its slots (vLLM), an Adapter sets it from
//     the engine's own wait queue.
//
// Without a memory source (no NVML on the node), before the first reading,
// or without a per-item estimate, the size comes from configuration alone:
// Max, capped by the ceiling and the engine. Engines that preallocate their
// KV cache (Ollama for all its parallel slots when it loads a model, vLLM,
// TGI) leave little memory free by design and need no more per batch; for
// them leave the per-item estimate unset and let Max, the engine cap and
// the ceiling decide. The estimate is configuration, not read from the
// engine, for that reason: Ollama's /api/show reports the model's maximum
// context length and its architecture, but not the context it allocates per
// slot, and the memory is already taken when it could be read.
//
// Every Decision names its binding limit: "memory", "max", "min", "config",
// "ceiling" or "engine".
//
// # Concurrency
//
// A Sizer is safe for concurrent use. Size is on the hot path: it reads one
// atomic pointer and does not allocate. Refresh calls the MemorySource from
// one goroutine at a time. The owner of a Sizer runs Run in a goroutine it
// waits for; Run returns when its context is done.
package sizing
