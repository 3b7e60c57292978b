package k8s

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// Binaries are the paths of the control plane's programs and of KEDA's
// CRDs, as scripts/build-k8s.sh leaves them.
type Binaries struct {
	Etcd, APIServer, ControllerManager, KEDA string
	// KEDACRDs is the directory of KEDA's CRD manifests, from the same
	// module version as the operator.
	KEDACRDs string
}

// RepoRoot is the directory of the project's go.mod, found upwards from
// the working directory.
func RepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		b, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && len(b) > 0 && modulePath(b) == "github.com/sous-run/sous" {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no go.mod of github.com/sous-run/sous above the working directory")
		}
		dir = parent
	}
}

func modulePath(gomod []byte) string {
	var m string
	if _, err := fmt.Sscanf(string(gomod), "module %s", &m); err != nil {
		return ""
	}
	return m
}

// FindBinaries returns the built control plane (and, with keda, the KEDA
// operator and its CRDs), or an error naming what is missing and how to
// build it.
func FindBinaries(keda bool) (Binaries, error) {
	root, err := RepoRoot()
	if err != nil {
		return Binaries{}, err
	}
	cache := filepath.Join(root, ".cache", "k8s")
	b := Binaries{
		Etcd:              filepath.Join(cache, "bin", "etcd"),
		APIServer:         filepath.Join(cache, "bin", "kube-apiserver"),
		ControllerManager: filepath.Join(cache, "bin", "kube-controller-manager"),
		KEDA:              filepath.Join(cache, "bin", "keda-operator"),
		KEDACRDs:          filepath.Join(cache, "keda-crds"),
	}
	need := []string{b.Etcd, b.APIServer, b.ControllerManager}
	if keda {
		need = append(need, b.KEDA, filepath.Join(b.KEDACRDs, "keda.sh_scaledobjects.yaml"))
	}
	for _, p := range need {
		if _, err := os.Stat(p); err != nil {
			return b, fmt.Errorf("%s is missing: run `make k8s` (builds the control plane and KEDA from their Go modules, about 15 minutes cold on 2 cores)", p)
		}
	}
	return b, nil
}

// NeedControlPlane returns the built control plane. When it is missing the
// test is skipped with one line, or fails when CI=true (CI runs `make
// test`, which builds it: a missing binary there is a broken build, not a
// reason to skip).
func NeedControlPlane(t testing.TB) Binaries { t.Helper(); return need(t, false) }

// NeedKEDA is NeedControlPlane plus the KEDA operator and its CRDs.
func NeedKEDA(t testing.TB) Binaries { t.Helper(); return need(t, true) }

func need(t testing.TB, keda bool) Binaries {
	t.Helper()
	b, err := FindBinaries(keda)
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("k8s: %v", err)
		}
		t.Skipf("k8s: %v", err)
	}
	return b
}
