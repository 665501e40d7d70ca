# The local MQTT broker of the test VMs, as an edge host runs it: no
# queue limit, so a subscriber that falls behind loses nothing.
{
  services.mosquitto = {
    enable = true;
    settings.max_queued_messages = 0;
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
