// Package helm holds the tests of agentry's Helm chart, which lives in this
// directory: they render the chart with the Helm SDK for the default values,
// every example values file and the optional features switched on, decode
// every rendered object strictly into its Kubernetes API type, check the
// behaviour the chart promises, and run helm lint. It is a module of its own
// so the Helm and Kubernetes dependencies stay out of the main module.
package helm
