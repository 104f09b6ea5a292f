// Prototype for issue 34 (benchmarks only, not loaded by the runners): MoDiff's delta path of one layer as one
// OpenVINO custom op, to time it against the element-wise subgraph the CPU plugin fuses today (Snippets).
//
//   inputs   x [B, ...] f32, a_hat [B, ...] f32            (the layer's input and its cache)
//   outputs  codes [B, ...] f32 (integers in -qmax..qmax)   feeds the int8 layer through a FakeQuantize
//            scale [B, 1, ...] f32                           per-sample absmax / qmax
//            a_hat_new [B, ...] f32                          a_hat + codes * scale
//   d = x - a_hat; s = max|d| / qmax (per sample; 1 where d is all zero); codes = clamp(rint(d * (1/s)))
//
// One pass reads x and a_hat for the absmax, a second reads them again and writes codes and a_hat_new (the first
// pass's reads are cache-resident for small layers only). Threads: ov::parallel_for over the samples.
#include <openvino/core/extension.hpp>
#include <openvino/core/op_extension.hpp>
#include <openvino/core/parallel.hpp>
#include <openvino/op/op.hpp>

#include <algorithm>
#include <cmath>

class DeltaQuant : public ov::op::Op {
public:
    OPENVINO_OP("DeltaQuant", "modiff");
    DeltaQuant() = default;
    DeltaQuant(const ov::Output<ov::Node>& x, const ov::Output<ov::Node>& a_hat, float qmax)
        : Op({x, a_hat}), qmax_(qmax) {
        constructor_validate_and_infer_types();
    }
    void validate_and_infer_types() override {
        const auto& ps = get_input_partial_shape(0);
        auto s = ps;
        for (size_t i = 1; i < s.size(); ++i) s[i] = 1;
        set_output_type(0, ov::element::f32, ps);
        set_output_type(1, ov::element::f32, s);
        set_output_type(2, ov::element::f32, ps);
    }
    std::shared_ptr<ov::Node> clone_with_new_inputs(const ov::OutputVector& args) const override {
        return std::make_shared<DeltaQuant>(args.at(0), args.at(1), qmax_);
    }
    bool visit_attributes(ov::AttributeVisitor& v) override {
        v.on_attribute("qmax", qmax_);
        return true;
    }
    bool has_evaluate() const override { return true; }
    bool evaluate(ov::TensorVector& out, const ov::TensorVector& in) const override {
        const auto shape = in[0].get_shape();
        const size_t B = shape[0], n = in[0].get_size() / B;
        out[0].set_shape(shape);
        auto sshape = shape;
        for (size_t i = 1; i < sshape.size(); ++i) sshape[i] = 1;
        out[1].set_shape(sshape);
        out[2].set_shape(shape);
        const float* x = in[0].data<const float>();
        const float* a = in[1].data<const float>();
        float* q = out[0].data<float>();
        float* sc = out[1].data<float>();
        float* an = out[2].data<float>();
        const float qmax = qmax_;
        ov::parallel_for(B, [&](size_t b) {
            const float* xb = x + b * n; const float* ab = a + b * n;
            float m = 0.f;
            for (size_t i = 0; i < n; ++i) m = std::max(m, std::fabs(xb[i] - ab[i]));
            const float s = m > 0.f ? m / qmax : 1.f, r = 1.f / s;
            sc[b] = s;
            float* qb = q + b * n; float* anb = an + b * n;
            for (size_t i = 0; i < n; ++i) {
                const float c = std::min(qmax, std::max(-qmax, std::nearbyint((xb[i] - ab[i]) * r)));
                qb[i] = c;
                anb[i] = ab[i] + c * s;
            }
        });
        return true;
    }

private:
    float qmax_ = 7.f;
};

OPENVINO_CREATE_EXTENSIONS(std::vector<ov::Extension::Ptr>({std::make_shared<ov::OpExtension<DeltaQuant>>()}));
