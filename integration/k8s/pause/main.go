// Command pause is the sandbox ("pause") container of the integration/k8s
// node: it holds a pod's namespaces and does nothing until SIGTERM or
// SIGINT. Nothing can be pulled here, so the node test builds it as a static
// binary into a scratch image (the kubelet's --pod-infra-container-image and
// containerd's sandbox_image) instead of registry.k8s.io/pause. As PID 1 of
// its pod it also reaps the zombies it inherits, as the upstream pause does.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sig := make(chan os.Signal, 8)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for s := range sig {
		if s != syscall.SIGCHLD {
			return
		}
		for {
			pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
