// Package lanes describes a worker's lanes and decides which lane gets a
// free slot.
//
// A lane is a request queue with a rank and a share. SOUS_LANES lists them
// highest rank first:
//
//	SOUS_LANES="interactive=sous.interactive,bulk=sous.bulk:share=0.2"
//
// Each entry is NAME=QUEUE with optional :key=value options; share is the
// least fraction of the engine's slots the lane gets over time while it has
// work (default 0.1 for every lane but the first, which needs none: it goes
// first); window is the most requests the worker holds of the lane
// (default: what the in-flight limit gives it). Parse reads the list; the worker, sousctl and the gateway share it.
//
// A Scheduler picks the lane for each free slot: a lane that has work and
// is below its share first (the furthest below it), else the highest-ranked
// lane that has work. Use is measured in slot-seconds (requests on the
// engine × time), not in requests, because answers differ a hundredfold in
// length, and decays with a time constant (Window) so that the share holds
// over the recent past, not since the start. Like internal/batch, a
// Scheduler reads no clock and owns no goroutine: the worker's dispatcher
// owns it and passes the time, so it is tested without sleeping.
package lanes
