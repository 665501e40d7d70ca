# The local MQTT broker of the test VMs, as an edge host runs it: no
# queue limit, so a subscriber that falls behind loses nothing, and room
# for 1,000 unacknowledged messages in flight (the default of 20 caps a
# subscriber that acknowledges only once a message is stored).
{
  services.mosquitto = {
    enable = true;
    settings.max_queued_messages = 0;
    settings.max_inflight_messages = 1000;
    listeners = [
      {
        address = "127.0.0.1";
        port = 1883;
        omitPasswordAuth = true;
        settings.allow_anonymous = true;
        acl = [ "topic readwrite #" ];
      }
    ];
  };
}
