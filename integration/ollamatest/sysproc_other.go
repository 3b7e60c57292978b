//go:build unix && !linux

package ollamatest

import "syscall"

// sysProcAttr puts the server in its own process group, so that a signal
// to the group reaches the runners it forks.
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true}
}
