package main

import (
	"strings"
	"testing"
)

func TestPodDeletionCostConfig(t *testing.T) {
	t.Parallel()
	inPod := []string{"KUBERNETES_SERVICE_HOST=10.0.0.1", "POD_NAME=sous-worker-abc", "POD_NAMESPACE=sous"}
	for _, tc := range []struct {
		name    string
		env     []string
		wantErr string // the variable the error names; "" for none
		enabled bool
	}{
		{"default outside Kubernetes: off", nil, "", false},
		{"default in a pod: on", inPod, "", true},
		{"auto without the downward API: off", []string{"KUBERNETES_SERVICE_HOST=10.0.0.1"}, "", false},
		{"off in a pod", append([]string{"SOUS_POD_DELETION_COST=off"}, inPod...), "", false},
		{"on", []string{"SOUS_POD_DELETION_COST=on", "POD_NAME=p", "POD_NAMESPACE=ns"}, "", true},
		{"on without the pod name", []string{"SOUS_POD_DELETION_COST=on", "POD_NAMESPACE=ns"}, "POD_NAME", false},
		{"on without the namespace", []string{"SOUS_POD_DELETION_COST=on", "POD_NAME=p"}, "POD_NAMESPACE", false},
		{"unknown mode", []string{"SOUS_POD_DELETION_COST=yes"}, "SOUS_POD_DELETION_COST", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			c, err := loadConfig(append([]string{"SOUS_MODEL=m"}, tc.env...))
			if tc.wantErr != "" {
				if err == nil || !strings.HasPrefix(err.Error(), tc.wantErr+":") {
					t.Fatalf("err %v, want one naming %s", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := c.PodCost.enabled(); got != tc.enabled {
				t.Fatalf("enabled %v, want %v", got, tc.enabled)
			}
		})
	}
}
