package rabbitmq

import "time"

// SetRestartHook makes f run in each consumer restart, between the cancel
// of the old consumer and the start of the new one; every restart for a
// prefetch change is allowed at once (no minReconsume spacing). Set it
// before the first Receive.
func SetRestartHook(d *Driver, f func()) {
	d.onRestart = f
	d.reconsume = time.Duration(0)
}
