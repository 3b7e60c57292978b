package ollamatest

import "syscall"

// sysProcAttr puts the server in its own process group, so that a signal
// to the group reaches the runners it forks, and kills it if the process
// that started it dies without Stop (a test binary that times out).
// Pdeathsig fires when the starting OS thread exits; Go keeps threads
// alive unless a goroutine exits while locked to one, which this package
// never does.
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
}
