// The Argo CD health-check runner of the tests (see main.go). Built by hack/testbins.sh.
module gpupool.dev/hack/argocd-health

go 1.26.0

require (
	github.com/yuin/gopher-lua v1.1.2
	gopkg.in/yaml.v3 v3.0.1
	layeh.com/gopher-json v0.0.0-20190114024228-97fed8db8427
)
