package deploy_test

import (
	"math"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// The image sizes deploy/TESTING.md gives must add up (image = base + what
// sous adds, the same addition in both images), and must be the sizes of
// the images built on this machine, where there are any (make test builds
// them; without Docker or without the images that part skips). The figures
// drifted once: 59.7 MB in the table against 95 MB built.
func TestImageSizesInTheReadme(t *testing.T) {
	t.Parallel()
	b, err := os.ReadFile("TESTING.md")
	if err != nil {
		t.Fatal(err)
	}
	row := regexp.MustCompile("(?m)^\\| `(sous-worker(?:-ollama)?:dev)` \\| \\**([0-9.]+) MB\\** \\| ([0-9.]+) MB .*?(?:add|the same) ([0-9.]+) MB")
	sizes := map[string][3]float64{}
	for _, m := range row.FindAllStringSubmatch(string(b), -1) {
		var v [3]float64
		for i := range v {
			v[i], _ = strconv.ParseFloat(m[i+2], 64)
		}
		sizes[m[1]] = v
	}
	if len(sizes) != 2 {
		t.Fatalf("deploy/TESTING.md's size table: want rows for sous-worker:dev and sous-worker-ollama:dev with size, base and what is added; got %v", sizes)
	}
	if w, o := sizes["sous-worker:dev"][2], sizes["sous-worker-ollama:dev"][2]; w != o {
		t.Errorf("sous adds %.1f MB to one image and %.1f MB to the other: the same binaries", w, o)
	}
	for img, v := range sizes {
		if math.Abs(v[0]-(v[1]+v[2])) > 0.2 {
			t.Errorf("%s: %.1f MB is not its base %.1f MB + %.1f MB", img, v[0], v[1], v[2])
		}
	}
	docker, err := exec.LookPath("docker")
	if err != nil {
		t.Skip("no docker: the sizes are not compared with built images")
	}
	for img, v := range sizes {
		out, err := exec.Command(docker, "image", "inspect", "--format", "{{.Size}}", img).Output()
		if err != nil {
			t.Logf("%s is not built here (make images): not compared", img)
			continue
		}
		n, err := strconv.ParseFloat(strings.TrimSpace(string(out)), 64)
		if err != nil {
			t.Fatal(err)
		}
		if built := n / 1e6; math.Abs(built-v[0]) > 0.03*built {
			t.Errorf("%s is %.1f MB as built here; deploy/TESTING.md says %.1f MB", img, built, v[0])
		}
	}
}
